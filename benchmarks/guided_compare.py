"""Compare grammar libraries for guided JSON decoding: schema compile time and per-token mask time.

Builds a byte-level BPE tokenizer of ~32k tokens (trained on a generated corpus), then for each
installed library compiles a small JSON schema and walks a valid JSON document token by token,
timing the mask computation at every step. Not a test; run::

    .venv/bin/python benchmarks/guided_compare.py
"""

from __future__ import annotations

import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "active"],
    "additionalProperties": False,
}
DOC = '{"name": "Ada Lovelace", "age": 36, "tags": ["math", "engines"], "active": true}'


def build_tokenizer(dest: Path, vocab_size: int = 32000) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 {}[]:,\"'.-_"
    corpus = []
    for _ in range(60000):
        words = ["".join(rng.choices(letters, k=rng.randint(1, 9))) for _ in range(12)]
        corpus.append(" ".join(words))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|pad|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.save(str(dest / "tokenizer.json"))
    return PreTrainedTokenizerFast(
        tokenizer_file=str(dest / "tokenizer.json"), eos_token="<|im_end|>"
    )


def bench_llguidance(hf: Any, ids: list[int], schema: dict[str, Any]) -> dict[str, float]:
    import llguidance
    import llguidance.hf
    import torch

    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(hf)
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
    matcher = llguidance.LLMatcher(lltok, grammar)
    assert not matcher.is_error(), matcher.get_error()
    t_compile = time.perf_counter() - t0
    mask = torch.zeros(((len(hf) + 31) // 32,), dtype=torch.int32)
    steps = []
    for token in ids:
        t0 = time.perf_counter()
        matcher.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)
        steps.append(time.perf_counter() - t0)
        assert matcher.consume_token(token), matcher.get_error()
    return _summary(t_tok, t_compile, steps)


def bench_outlines(hf: Any, ids: list[int], schema: dict[str, Any]) -> dict[str, float]:
    import outlines_core as oc
    import torch

    t0 = time.perf_counter()
    eos = hf.eos_token_id
    decode = _byte_decoder()
    vocab_map: dict[bytes, list[int]] = {}
    for token, idx in hf.get_vocab().items():
        if idx == eos:
            continue
        key = token.encode() if token in hf.all_special_tokens else bytes(decode[c] for c in token)
        vocab_map.setdefault(key, []).append(idx)
    vocab = oc.Vocabulary(eos, vocab_map)
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    regex = oc.json_schema.build_regex_from_schema(json.dumps(schema))
    index = oc.Index(regex, vocab)
    t_compile = time.perf_counter() - t0
    guide = oc.Guide(index)
    mask = torch.zeros(((len(hf) + 31) // 32,), dtype=torch.int32)
    steps = []
    for token in ids:
        t0 = time.perf_counter()
        guide.write_mask_into(mask.data_ptr(), mask.numel(), 4)
        steps.append(time.perf_counter() - t0)
        guide.advance(token)
    return _summary(t_tok, t_compile, steps)


def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level alphabet: printable char -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _summary(t_tok: float, t_compile: float, steps: list[float]) -> dict[str, float]:
    return {
        "tokenizer_setup_ms": t_tok * 1e3,
        "schema_compile_ms": t_compile * 1e3,
        "mask_us_median": statistics.median(steps) * 1e6,
        "mask_us_p90": sorted(steps)[int(0.9 * len(steps))] * 1e6,
        "mask_us_max": max(steps) * 1e6,
        "steps": float(len(steps)),
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        hf = build_tokenizer(Path(tmp))
        ids = hf.encode(DOC, add_special_tokens=False)
        print(f"vocab {len(hf)}, document {len(ids)} tokens")
        for label, schema in (("schema", SCHEMA), ("json_object", {"type": "object"})):
            for name, fn in (("llguidance", bench_llguidance), ("outlines-core", bench_outlines)):
                try:
                    result = fn(hf, ids, schema)
                except ImportError as exc:
                    print(f"{name}: not installed ({exc})")
                    continue
                except Exception as exc:  # a library that cannot handle the schema
                    print(f"{label} {name}: failed: {type(exc).__name__}: {exc}"[:300])
                    continue
                print(label, name, json.dumps({k: round(v, 1) for k, v in result.items()}))


if __name__ == "__main__":
    main()
