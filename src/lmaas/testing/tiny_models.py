"""Tiny random-weight models in the standard Hugging Face layout, for tests and the demo.

The machines lmaas is developed on reach no model hub, so tests build their models from a config:
a byte-level BPE tokenizer trained on a small built-in corpus, decoder-only LMs of the Llama,
Qwen2, Qwen3, Mistral and GPT-2 shapes, and a BERT-shaped sentence-transformers encoder. Every
builder is deterministic given its seed. The weights are random: the models produce gibberish,
and any quality number measured on them is meaningless.

Command line (``lmaas serve`` builds its demo model this way, in a subprocess, so the gateway
never imports torch)::

    python -m lmaas.testing.tiny_models DEST --kind chat|embedding [--family llama]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer, WordPieceTrainer

from lmaas.testing._tiny_corpus import CORPUS_LINES

FAMILIES = ("llama", "qwen2", "mistral", "gpt2", "qwen3")
"""Decoder families :func:`build_tiny_causal_lm` knows."""

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
_SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, "<|endoftext|>", "<|im_start|>", EOS_TOKEN]
_BPE_VOCAB_SIZE = 768
_MAX_POSITIONS = 512

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""ChatML, as Qwen2 and many others use it."""


def build_tokenizer(dest: Path) -> None:
    """Write a byte-level BPE tokenizer (``tokenizer.json`` + ``tokenizer_config.json``).

    Byte-level pieces cover all 256 bytes, so any UTF-8 text, emoji included, round-trips. The
    config names bos/eos/pad tokens and carries a ChatML ``chat_template``.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=_BPE_VOCAB_SIZE,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS_LINES, trainer=trainer)
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(dest / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "model_max_length": _MAX_POSITIONS,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHATML_TEMPLATE,
    }
    _write_json(dest / "tokenizer_config.json", config)


def _token_ids(dest: Path) -> tuple[int, dict[str, int]]:
    tokenizer = Tokenizer.from_file(str(dest / "tokenizer.json"))
    ids: dict[str, int] = {}
    for token in _SPECIAL_TOKENS:
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise RuntimeError(f"special token {token!r} missing from the trained vocabulary")
        ids[token] = token_id
    return tokenizer.get_vocab_size(), ids


def _decoder_config(family: str, vocab_size: int, ids: dict[str, int], **dims: int) -> Any:
    import transformers

    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "bos_token_id": ids[BOS_TOKEN],
        "eos_token_id": ids[EOS_TOKEN],
        "pad_token_id": ids[PAD_TOKEN],
        "tie_word_embeddings": family == "gpt2",
    }
    hidden, layers, heads = dims["hidden_size"], dims["num_layers"], dims["num_heads"]
    if family == "gpt2":
        return transformers.GPT2Config(
            n_embd=hidden, n_layer=layers, n_head=heads, n_positions=_MAX_POSITIONS, **common
        )
    classes = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "mistral": transformers.MistralConfig,
        "qwen3": transformers.Qwen3Config,
    }
    return classes[family](
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=dims["num_kv_heads"],
        head_dim=hidden // heads,
        max_position_embeddings=_MAX_POSITIONS,
        **common,
    )


def build_tiny_causal_lm(
    dest: Path,
    family: str = "llama",
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
) -> Path:
    """Write a random-weight decoder LM of ``family`` with its tokenizer into ``dest``; return it.

    Args:
        dest: Target directory (created).
        family: One of :data:`FAMILIES`.
        seed: Seeds the weight initialisation; the same seed gives the same weights.
        hidden_size, num_layers, num_heads, num_kv_heads: Model shape (GPT-2 has no KV groups).

    Raises:
        ValueError: for an unknown family.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    import transformers

    build_tokenizer(dest)
    vocab_size, ids = _token_ids(dest)
    shape = {"hidden_size": hidden_size, "num_layers": num_layers, "num_heads": num_heads}
    config = _decoder_config(family, vocab_size, ids, num_kv_heads=num_kv_heads, **shape)
    torch.manual_seed(seed)
    # transformers ships partial annotations; these two entry points are untyped.
    model = transformers.AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    model.generation_config = transformers.GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=ids[BOS_TOKEN],
        eos_token_id=[ids[EOS_TOKEN], ids["<|endoftext|>"]],
        pad_token_id=ids[PAD_TOKEN],
    )
    model.save_pretrained(str(dest), safe_serialization=True)
    return dest


BENCH_LLAMA_SHAPE = {
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
}
"""The ~125M-parameter Llama shape of the serving benchmark (issue 3)."""


def build_bench_llama(dest: Path, *, seed: int = 0, max_positions: int = 2048) -> Path:
    """Write the benchmark's random-weight bf16 Llama (:data:`BENCH_LLAMA_SHAPE`) into ``dest``.

    The tokenizer is the tiny byte-level BPE, padded with plain added tokens (`` w0``,
    `` w1``...) up to the model's 32000 ids, so every id the model can emit decodes to text.

    Returns:
        ``dest``.
    """
    import transformers
    from tokenizers import AddedToken

    build_tokenizer(dest)
    vocab_size = BENCH_LLAMA_SHAPE["vocab_size"]
    tokenizer = Tokenizer.from_file(str(dest / "tokenizer.json"))
    padding = vocab_size - tokenizer.get_vocab_size()
    tokenizer.add_tokens([AddedToken(f" w{i}", normalized=False) for i in range(padding)])
    tokenizer.save(str(dest / "tokenizer.json"))
    tokenizer_config = json.loads((dest / "tokenizer_config.json").read_text(encoding="utf-8"))
    _write_json(
        dest / "tokenizer_config.json", tokenizer_config | {"model_max_length": max_positions}
    )
    _, ids = _token_ids(dest)
    shape = BENCH_LLAMA_SHAPE
    config = transformers.LlamaConfig(
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_hidden_layers"],
        num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_key_value_heads"],
        vocab_size=vocab_size,
        head_dim=shape["hidden_size"] // shape["num_attention_heads"],
        max_position_embeddings=max_positions,
        bos_token_id=ids[BOS_TOKEN],
        eos_token_id=ids[EOS_TOKEN],
        pad_token_id=ids[PAD_TOKEN],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    model = model.to(torch.bfloat16)
    model.generation_config = transformers.GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=ids[BOS_TOKEN],
        eos_token_id=[ids[EOS_TOKEN], ids["<|endoftext|>"]],
        pad_token_id=ids[PAD_TOKEN],
    )
    model.save_pretrained(str(dest), safe_serialization=True)
    return dest


def _build_wordpiece_tokenizer(dest: Path) -> None:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = WordPieceTrainer(vocab_size=600, special_tokens=specials, show_progress=False)
    tokenizer.train_from_iterator(CORPUS_LINES, trainer=trainer)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(dest / "tokenizer.json"))
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    (dest / "vocab.txt").write_text("".join(f"{token}\n" for token, _ in vocab), encoding="utf-8")
    config = {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": True,
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "mask_token": "[MASK]",
        "model_max_length": _MAX_POSITIONS,
    }
    _write_json(dest / "tokenizer_config.json", config)


def _sentence_transformers_files(
    dest: Path, hidden_size: int, *, normalize: bool, pooling: str, max_seq_length: int
) -> None:
    modes = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "lasttoken")
    mode_of = {"cls": "cls_token", "mean": "mean_tokens", "max": "max_tokens"}
    mode_of["lasttoken"] = "lasttoken"
    if pooling not in mode_of:
        raise ValueError(f"unknown pooling {pooling!r}; expected one of {', '.join(mode_of)}")
    pooling_config: dict[str, Any] = {"word_embedding_dimension": hidden_size}
    pooling_config.update({f"pooling_mode_{m}": m == mode_of[pooling] for m in modes})
    (dest / "1_Pooling").mkdir(exist_ok=True)
    _write_json(dest / "1_Pooling" / "config.json", pooling_config)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    if normalize:
        modules.append(
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize",
            }
        )
    _write_json(dest / "modules.json", modules)
    bert_config = {"max_seq_length": max_seq_length, "do_lower_case": False}
    _write_json(dest / "sentence_bert_config.json", bert_config)


def build_tiny_embedder(
    dest: Path,
    *,
    seed: int = 0,
    normalize: bool = True,
    pooling: str = "mean",
    hidden_size: int = 64,
    num_layers: int = 2,
    max_seq_length: int = 128,
    family: str = "bert",
) -> Path:
    """Write a random-weight BERT encoder in sentence-transformers layout into ``dest``.

    Args:
        dest: Target directory (created).
        seed: Seeds the weight initialisation.
        normalize: List a ``Normalize`` module in ``modules.json`` (no directory, like
            all-MiniLM-L6-v2).
        pooling: ``mean``, ``cls``, ``max`` or ``lasttoken``.
        hidden_size, num_layers: Model shape.
        max_seq_length: Longer inputs are truncated by the serving runtime.
        family: ``bert``, ``roberta`` (positions count from ``pad_token_id + 1``, one segment
            type) or ``electra`` (embeddings narrower than the hidden size, projected); the
            same WordPiece tokenizer either way.

    Returns:
        ``dest``.
    """
    import transformers

    _build_wordpiece_tokenizer(dest)
    vocab_size = Tokenizer.from_file(str(dest / "tokenizer.json")).get_vocab_size()
    shape: dict[str, Any] = {
        "vocab_size": vocab_size, "hidden_size": hidden_size, "num_hidden_layers": num_layers,
        "num_attention_heads": 4, "intermediate_size": hidden_size * 2, "pad_token_id": 0,
        "max_position_embeddings": _MAX_POSITIONS,
    }  # fmt: skip
    torch.manual_seed(seed)
    model: Any
    if family == "roberta":
        shape.update(max_position_embeddings=_MAX_POSITIONS + 2, type_vocab_size=1)
        model = transformers.RobertaModel(transformers.RobertaConfig(**shape))
    elif family == "electra":
        model = transformers.ElectraModel(
            transformers.ElectraConfig(**shape, embedding_size=hidden_size // 2)
        )
    elif family == "bert":
        model = transformers.BertModel(transformers.BertConfig(**shape))
    else:
        raise ValueError(f"unknown encoder family {family!r}: bert, roberta or electra")
    model.save_pretrained(str(dest), safe_serialization=True)
    _sentence_transformers_files(
        dest, hidden_size, normalize=normalize, pooling=pooling, max_seq_length=max_seq_length
    )
    return dest


def _write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Build a demo model: ``DEST --kind chat|embedding [--family llama] [--seed 0]``."""
    parser = argparse.ArgumentParser(
        prog="python -m lmaas.testing.tiny_models",
        description="Build a tiny model with RANDOM weights (for tests and demos; output is "
        "gibberish and quality numbers measured on it mean nothing).",
    )
    parser.add_argument("dest", type=Path, help="directory to write the model into")
    parser.add_argument("--kind", choices=("chat", "embedding"), default="chat")
    parser.add_argument("--family", choices=FAMILIES, default="llama")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.kind == "chat":
        # A little bigger than the test models, still far below 1 ms per token on a CPU.
        build_tiny_causal_lm(args.dest, args.family, seed=args.seed, hidden_size=128, num_layers=4)
    else:
        build_tiny_embedder(args.dest, seed=args.seed)
    print(args.dest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
