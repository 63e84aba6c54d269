"""A tiny random-weight Whisper in the standard Hugging Face layout, for the speech tests.

The layout is the one ``openai/whisper-*`` checkpoints ship: ``config.json``,
``generation_config.json`` (language and task tokens, timestamp settings),
``model.safetensors``, ``preprocessor_config.json`` (80 log-mel bins, 16 kHz) and a
``WhisperTokenizer`` (byte-level BPE trained on the built-in corpus, Whisper's special tokens and
1501 timestamp tokens ``<|0.00|>``...``<|30.00|>``). The weights are random: the model produces
gibberish, and any word error rate measured on it is meaningless.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from tokenizers.trainers import BpeTrainer

from lmaas.testing._tiny_corpus import CORPUS_LINES

LANGUAGES = ("en", "fr", "de")
"""Language tokens of the tiny multilingual Whisper."""

_EOT = "<|endoftext|>"
_NUM_TIMESTAMPS = 1501
"""``<|0.00|>`` to ``<|30.00|>`` in steps of 20 ms, as Whisper has."""
_BPE_VOCAB_SIZE = 512
_MAX_TARGET_POSITIONS = 448
_MAX_SOURCE_POSITIONS = 1500
"""30 s of audio: 3000 mel frames, halved by the encoder's strided convolution."""


def _special_tokens(multilingual: bool) -> list[str]:
    languages = [f"<|{code}|>" for code in LANGUAGES] if multilingual else []
    return [
        "<|startoftranscript|>",
        *languages,
        "<|translate|>",
        "<|transcribe|>",
        "<|startoflm|>",
        "<|startofprev|>",
        "<|nospeech|>",
        "<|notimestamps|>",
    ]


def _build_tokenizer(dest: Path, multilingual: bool) -> dict[str, int]:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=_BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS_LINES, trainer=trainer)
    specials = _special_tokens(multilingual)
    # Special ids follow the text vocabulary, <|endoftext|> first: the Whisper tokenizer tells
    # special from text ids by comparing with it.
    tokenizer.add_special_tokens([AddedToken(t, normalized=False) for t in [_EOT, *specials]])
    # Timestamps are plain added tokens, numbered right after <|notimestamps|>, as in Whisper.
    stamps = [f"<|{i * 0.02:.2f}|>" for i in range(_NUM_TIMESTAMPS)]
    tokenizer.add_tokens([AddedToken(t, normalized=False) for t in stamps])
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(dest / "tokenizer.json"))
    config = {
        "tokenizer_class": "WhisperTokenizer",
        "bos_token": _EOT,
        "eos_token": _EOT,
        "unk_token": _EOT,
        "pad_token": _EOT,
        "model_max_length": _MAX_TARGET_POSITIONS,
        "clean_up_tokenization_spaces": False,
        "additional_special_tokens": specials,
        "errors": "replace",
    }
    _write_json(dest / "tokenizer_config.json", config)
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    return {token: vocab[token] for token in [_EOT, *specials]} | {"__size__": len(vocab)}


def _generation_config(ids: dict[str, int], multilingual: bool) -> Any:
    import transformers

    languages: dict[str, Any] = {}
    if multilingual:
        languages["lang_to_id"] = {f"<|{code}|>": ids[f"<|{code}|>"] for code in LANGUAGES}
        languages["task_to_id"] = {
            "transcribe": ids["<|transcribe|>"],
            "translate": ids["<|translate|>"],
        }
    return transformers.GenerationConfig(  # type: ignore[no-untyped-call]
        decoder_start_token_id=ids["<|startoftranscript|>"],
        bos_token_id=ids[_EOT],
        eos_token_id=ids[_EOT],
        pad_token_id=ids[_EOT],
        max_length=_MAX_TARGET_POSITIONS,
        no_timestamps_token_id=ids["<|notimestamps|>"],
        prev_sot_token_id=ids["<|startofprev|>"],
        max_initial_timestamp_index=50,
        begin_suppress_tokens=[ids[_EOT]],
        suppress_tokens=[],
        is_multilingual=multilingual,
        return_timestamps=False,
        **languages,
    )


def build_tiny_whisper(
    dest: Path,
    *,
    seed: int = 0,
    multilingual: bool = True,
    d_model: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
) -> Path:
    """Write a random-weight ``WhisperForConditionalGeneration`` and its processor into ``dest``.

    Args:
        dest: Target directory (created).
        seed: Seeds the weight initialisation; the same seed gives the same weights.
        multilingual: With language tokens (:data:`LANGUAGES`) and task tokens, as
            ``whisper-tiny``; without, English-only, as ``whisper-tiny.en``.
        d_model, num_layers, num_heads: Model shape (encoder and decoder alike).

    Returns:
        ``dest``.
    """
    import transformers

    ids = _build_tokenizer(dest, multilingual)
    config = transformers.WhisperConfig(
        vocab_size=ids["__size__"],
        num_mel_bins=80,
        d_model=d_model,
        encoder_layers=num_layers,
        decoder_layers=num_layers,
        encoder_attention_heads=num_heads,
        decoder_attention_heads=num_heads,
        encoder_ffn_dim=d_model * 2,
        decoder_ffn_dim=d_model * 2,
        max_source_positions=_MAX_SOURCE_POSITIONS,
        max_target_positions=_MAX_TARGET_POSITIONS,
        decoder_start_token_id=ids["<|startoftranscript|>"],
        bos_token_id=ids[_EOT],
        eos_token_id=ids[_EOT],
        pad_token_id=ids[_EOT],
    )
    config.architectures = ["WhisperForConditionalGeneration"]
    torch.manual_seed(seed)
    model = transformers.WhisperForConditionalGeneration(config)
    model.generation_config = _generation_config(ids, multilingual)
    model.save_pretrained(str(dest), safe_serialization=True)
    extractor = transformers.WhisperFeatureExtractor(feature_size=80)  # type: ignore[no-untyped-call]
    extractor.save_pretrained(str(dest))
    return dest


def _write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
