"""Pieces of ``embeddings_compare.py``: the sentences, the HTTP load, the in-process baseline.

* :func:`make_sentences`: deterministic English-like sentences of 8-64 tokens (counted with the
  model's own tokenizer, ``[CLS]``/``[SEP]`` included), built from the built-in corpus;
* :func:`http_load`: one request per sentence to an OpenAI-compatible ``/embeddings`` route at a
  fixed concurrency, timing each request and keeping every vector (for the cosine checks);
* :func:`sentence_transformers_phase`: ``SentenceTransformer.encode(batch_size=32)`` in a child
  process (it prints ``RESULT <json>``), so its threads never share a process with the client.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmaas.testing._tiny_corpus import CORPUS_LINES

RESULT_PREFIX = "RESULT "


def make_sentences(tokenizer_json: Path, count: int, seed: int = 0) -> list[str]:
    """``count`` sentences whose token counts are spread uniformly over 8..64."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    tokenizer.no_padding()  # all-MiniLM-L6-v2's file pads every input to 128
    tokenizer.no_truncation()
    words = [w for line in CORPUS_LINES for w in line.split()]
    rng = random.Random(seed)
    sentences: list[str] = []
    for _ in range(count * 100):
        if len(sentences) == count:
            break
        target = rng.randint(8, 64)
        start = rng.randrange(len(words))
        picked: list[str] = []
        for i in range(200):
            picked.append(words[(start + i) % len(words)])
            if len(tokenizer.encode(" ".join(picked)).ids) >= target:
                break
        text = " ".join(picked)
        if 8 <= len(tokenizer.encode(text).ids) <= 64:
            sentences.append(text)
    return sentences


@dataclass
class LoadResult:
    duration_s: float
    latencies_s: list[float]
    vectors: list[np.ndarray | None]
    errors: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        done = len(self.latencies_s)
        lat = sorted(self.latencies_s) or [0.0]
        return {
            "completed": done,
            "failed": len(self.errors),
            "duration_s": self.duration_s,
            "sentences_s": done / self.duration_s if self.duration_s > 0 else 0.0,
            "p50_ms": 1000 * float(np.percentile(lat, 50)),
            "p99_ms": 1000 * float(np.percentile(lat, 99)),
            "mean_ms": 1000 * statistics.fmean(lat),
            "first_errors": self.errors[:3],
        }


async def _load(
    url: str,
    model: str,
    sentences: list[str],
    concurrency: int,
    timeout_s: float,
    api_key: str | None = None,
) -> LoadResult:
    # The cheap closed loop of lmaas.bench.openloop, not aiohttp or httpx: on a 2-core machine
    # the load generator shares the cores with the server under test, and aiohttp costs ~4 ms
    # of CPU per request here (httpx ~11 ms), more than the model. The same client measures
    # every server. Bodies are decoded after the timing.
    from urllib.parse import urlsplit

    from lmaas.bench.openloop import encode_request, run_closed_loop

    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    requests = [
        encode_request(
            host,
            port,
            parts.path,
            json.dumps({"model": model, "input": s, "encoding_format": "base64"}).encode(),
            headers,
        )
        for s in sentences
    ]
    run = await run_closed_loop(host, port, requests, concurrency, timeout_s)
    vectors: list[np.ndarray | None] = [None] * len(sentences)
    latencies: list[float] = []
    errors: list[str] = []
    answers = zip(run.statuses, run.latencies_s, run.bodies, strict=True)
    for i, (status, latency, body) in enumerate(answers):
        if status is None or latency is None:
            errors.append("no answer (connection lost or timed out)")
            continue
        if status != 200:
            errors.append(f"{status}: {body[:200]!r}")
            continue
        latencies.append(latency)
        raw = json.loads(body)["data"][0]["embedding"]
        if isinstance(raw, str):
            vectors[i] = np.frombuffer(base64.b64decode(raw), dtype="<f4")
        else:  # a server that ignores encoding_format
            vectors[i] = np.asarray(raw, dtype=np.float32)
    return LoadResult(run.duration_s, latencies, vectors, errors)


def http_load(
    base_url: str,
    model: str,
    sentences: list[str],
    concurrency: int,
    *,
    warmup: int = 32,
    timeout_s: float = 600.0,
    api_key: str | None = None,
) -> LoadResult:
    """Warm up with ``warmup`` requests, then send every sentence once at ``concurrency``."""
    url = f"{base_url}/embeddings"
    warm = sentences[:warmup]
    asyncio.run(_load(url, model, warm, min(concurrency, warmup), timeout_s, api_key))
    return asyncio.run(_load(url, model, sentences, concurrency, timeout_s, api_key))


def cosines(vectors: list[np.ndarray | None], reference: np.ndarray) -> dict[str, float] | None:
    """Min and mean cosine of the returned vectors to the reference rows (None: none back)."""
    rows = [(i, v) for i, v in enumerate(vectors) if v is not None]
    if not rows:
        return None
    got = np.stack([v for _, v in rows])
    ref = reference[[i for i, _ in rows]]
    cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    return {"min": float(cos.min()), "mean": float(cos.mean())}


def sentence_transformers_phase(args: dict[str, Any]) -> dict[str, Any]:
    """Encode the sentences in-process; save the vectors; return sentences/s."""
    import torch
    from sentence_transformers import SentenceTransformer

    sentences: list[str] = args["sentences"]
    model = SentenceTransformer(args["model_dir"], device="cpu")
    model.encode(sentences[:64], batch_size=32)  # warm-up
    start = time.perf_counter()
    vectors = model.encode(sentences, batch_size=32, convert_to_numpy=True)
    duration = time.perf_counter() - start
    np.save(args["out"], vectors.astype(np.float32))
    return {
        "duration_s": duration,
        "sentences_s": len(sentences) / duration,
        "torch_threads": torch.get_num_threads(),
    }
