"""Tiny random-weight encoder-decoder models (T5, Marian, BART shapes) in Hugging Face layout.

Each builder writes ``config.json``, ``generation_config.json``, ``model.safetensors`` and a
tokenizer, then the models go through ``lmaas models import`` like real ones. The weights are
random: the output is gibberish and any quality number measured on these models means nothing.

**Tokenizers.** Real T5 and Marian checkpoints ship SentencePiece models (``spiece.model``,
``source.spm`` / ``target.spm``), which need the ``sentencepiece`` package to build and to read.
These machines cannot download one, and lmaas does not depend on ``sentencepiece``, so the tiny
models carry an equivalent ``tokenizers``-library tokenizer in ``tokenizer.json`` instead: a
Unigram model with the SentencePiece ``▁`` (Metaspace) pre-tokenizer and decoder, the special
tokens at the ids the real models use (T5: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2; Marian:
``</s>`` 0, ``<unk>`` 1, ``<pad>`` last, which is also the decoder start) and a post-processor
that appends ``</s>``. T5 names ``T5Tokenizer`` (tokenizers-backed in transformers 5); Marian
names ``PreTrainedTokenizerFast``, because ``MarianTokenizer`` only reads ``.spm`` files. BART
uses a byte-level BPE with ``<s> … </s>`` around the input, as ``facebook/bart-*`` does.

Command line::

    python -m lmaas.testing.tiny_seq2seq DEST --shape t5|marian|bart
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer, UnigramTrainer

from lmaas.testing._tiny_corpus import CORPUS_LINES

SHAPES = ("t5", "marian", "bart")
"""Encoder-decoder shapes :func:`build_tiny_seq2seq` knows."""

_VOCAB_SIZE = 600
_MAX_POSITIONS = 512


def _unigram_tokenizer(specials: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = UnigramTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=specials,
        unk_token="<unk>",
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS_LINES, trainer=trainer)
    return tokenizer


def _append_eos(tokenizer: Tokenizer) -> None:
    eos_id = tokenizer.token_to_id("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos_id)]
    )


def _t5_tokenizer(dest: Path) -> dict[str, int]:
    tokenizer = _unigram_tokenizer(["<pad>", "</s>", "<unk>"])
    _append_eos(tokenizer)
    tokenizer.save(str(dest / "tokenizer.json"))
    config = {
        "tokenizer_class": "T5Tokenizer",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "extra_ids": 0,
        "model_max_length": _MAX_POSITIONS,
    }
    _write_json(dest / "tokenizer_config.json", config)
    return _ids(tokenizer, ["<pad>", "</s>", "<unk>"])


def _marian_tokenizer(dest: Path) -> dict[str, int]:
    tokenizer = _unigram_tokenizer(["</s>", "<unk>"])
    # Marian keeps <pad> as the last id; it doubles as the decoder start token.
    tokenizer.add_special_tokens(["<pad>"])
    _append_eos(tokenizer)
    tokenizer.save(str(dest / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "model_max_length": _MAX_POSITIONS,
    }
    _write_json(dest / "tokenizer_config.json", config)
    return _ids(tokenizer, ["</s>", "<unk>", "<pad>"])


def _bart_tokenizer(dest: Path) -> dict[str, int]:
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS_LINES, trainer=trainer)
    ids = _ids(tokenizer, specials)
    tokenizer.post_processor = processors.RobertaProcessing(
        ("</s>", ids["</s>"]), ("<s>", ids["<s>"]), add_prefix_space=False
    )
    tokenizer.save(str(dest / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "mask_token": "<mask>",
        "model_max_length": _MAX_POSITIONS,
        "clean_up_tokenization_spaces": False,
    }
    _write_json(dest / "tokenizer_config.json", config)
    return ids


def _ids(tokenizer: Tokenizer, tokens: list[str]) -> dict[str, int]:
    ids: dict[str, int] = {}
    for token in tokens:
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise RuntimeError(f"special token {token!r} missing from the trained vocabulary")
        ids[token] = token_id
    return ids


def _config(shape: str, vocab_size: int, ids: dict[str, int], hidden: int, layers: int) -> Any:
    """The model config; the initialisation is wider than the default so that greedy decoding
    of the random weights varies its tokens instead of repeating one (a sharper equivalence
    test)."""
    import transformers

    if shape == "t5":
        # Keys T5Config takes through **kwargs (checked by mypy only when named).
        extra: dict[str, Any] = {
            "decoder_start_token_id": ids["<pad>"], "n_positions": _MAX_POSITIONS,
        }  # fmt: skip
        return transformers.T5Config(
            vocab_size=vocab_size, d_model=hidden, d_kv=hidden // 4, d_ff=hidden * 2,
            num_layers=layers, num_decoder_layers=layers, num_heads=4,
            relative_attention_num_buckets=16, relative_attention_max_distance=64,
            pad_token_id=ids["<pad>"], eos_token_id=ids["</s>"],
            initializer_factor=10.0, architectures=["T5ForConditionalGeneration"], **extra,
        )  # fmt: skip
    common: dict[str, Any] = {
        "vocab_size": vocab_size, "d_model": hidden, "encoder_layers": layers,
        "decoder_layers": layers, "encoder_attention_heads": 4, "decoder_attention_heads": 4,
        "encoder_ffn_dim": hidden * 2, "decoder_ffn_dim": hidden * 2,
        "max_position_embeddings": _MAX_POSITIONS, "pad_token_id": ids["<pad>"],
        "eos_token_id": ids["</s>"], "forced_eos_token_id": ids["</s>"], "init_std": 0.3,
    }  # fmt: skip
    if shape == "marian":
        return transformers.MarianConfig(
            **common, decoder_start_token_id=ids["<pad>"], scale_embedding=True,
            architectures=["MarianMTModel"],
        )  # fmt: skip
    common["forced_bos_token_id"] = ids["<s>"]
    return transformers.BartConfig(
        **common, bos_token_id=ids["<s>"], decoder_start_token_id=ids["</s>"],
        architectures=["BartForConditionalGeneration"],
    )  # fmt: skip


def _generation_config(shape: str, ids: dict[str, int]) -> Any:
    import transformers

    fields: dict[str, Any] = {
        "eos_token_id": ids["</s>"],
        "pad_token_id": ids["<pad>"],
        "decoder_start_token_id": ids["</s>" if shape == "bart" else "<pad>"],
        "max_length": _MAX_POSITIONS,
    }
    if shape in ("marian", "bart"):
        fields["forced_eos_token_id"] = ids["</s>"]
    if shape == "marian":
        # As Helsinki-NLP/opus-mt-* do: the decoder may never emit <pad>.
        fields["bad_words_ids"] = [[ids["<pad>"]]]
    if shape == "bart":
        fields["bos_token_id"] = ids["<s>"]
        fields["forced_bos_token_id"] = ids["<s>"]
    return transformers.GenerationConfig(**fields)  # type: ignore[no-untyped-call]


def build_tiny_seq2seq(
    dest: Path, shape: str = "t5", *, seed: int = 0, hidden_size: int = 64, num_layers: int = 2
) -> Path:
    """Write a random-weight encoder-decoder of ``shape`` with its tokenizer into ``dest``.

    Args:
        dest: Target directory (created).
        shape: One of :data:`SHAPES`.
        seed: Seeds the weight initialisation; the same seed gives the same weights.
        hidden_size, num_layers: Model shape (4 attention heads).

    Returns:
        ``dest``.

    Raises:
        ValueError: for an unknown shape.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")
    import transformers

    dest.mkdir(parents=True, exist_ok=True)
    build = {"t5": _t5_tokenizer, "marian": _marian_tokenizer, "bart": _bart_tokenizer}[shape]
    ids = build(dest)
    vocab_size = Tokenizer.from_file(str(dest / "tokenizer.json")).get_vocab_size()
    config = _config(shape, vocab_size, ids, hidden_size, num_layers)
    torch.manual_seed(seed)
    # transformers ships partial annotations; this entry point is untyped.
    model = transformers.AutoModelForSeq2SeqLM.from_config(config)  # type: ignore[no-untyped-call]
    model.generation_config = _generation_config(shape, ids)
    model.save_pretrained(str(dest), safe_serialization=True)
    return dest


def _write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Build a tiny seq2seq model: ``DEST --shape t5|marian|bart [--seed 0]``."""
    parser = argparse.ArgumentParser(
        prog="python -m lmaas.testing.tiny_seq2seq",
        description="Build a tiny encoder-decoder with RANDOM weights (tests and demos only).",
    )
    parser.add_argument("dest", type=Path, help="directory to write the model into")
    parser.add_argument("--shape", choices=SHAPES, default="t5")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    build_tiny_seq2seq(args.dest, args.shape, seed=args.seed)
    print(args.dest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
