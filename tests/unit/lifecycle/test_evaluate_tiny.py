"""The evaluation pipeline on tiny random-weight models.

The numbers are meaningless (random weights); what is checked is the pipeline: the model runs
through the worker's runners, its predictions are scored right (labels built from the model's own
outputs must score 1.0, flipped ones exactly lower), and the results land on the version.
"""

from __future__ import annotations

import json
import math
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from lmaas.core.errors import InvalidRequestError, NotSupportedError
from lmaas.core.messages import (
    ClassifyRequest,
    ClassifyResult,
    ModelInfo,
    RerankRequest,
    ScoreResult,
    TranscribeRequest,
    TranscriptionResult,
)
from lmaas.core.types import Task
from lmaas.lifecycle.datasets import load_eval_data
from lmaas.lifecycle.eval_tasks import EvalOptions, evaluate_with_runner
from lmaas.lifecycle.evaluate import EvaluationResult, evaluate, store
from lmaas.lifecycle.metrics import error_rates, transcript_words
from lmaas.registry.service import RegistryService
from lmaas.registry.serving import worker_spec_for
from lmaas.runtimes.base import BatchRunner
from lmaas.runtimes.batching import run_batch
from lmaas.runtimes.catalog import create_runner

TEXTS = [
    "I love this",
    "This is terrible",
    "It is a table",
    "what a day",
    "cats and dogs",
    "the stock market fell",
    "a b c",
    "zzz",
]


class _Progress:
    def __init__(self) -> None:
        self.total = -1
        self.done = 0

    def start(self, total: int, description: str) -> None:
        self.total = total

    def advance(self, num_examples: int) -> None:
        self.done += num_examples


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(
    registry: RegistryService, ref: str, data: Path, split: str | None = None, **options: Any
) -> EvaluationResult:
    progress = _Progress()
    manifest = registry.resolve(ref)
    result = evaluate(
        registry,
        manifest,
        load_eval_data(data, split, options.pop("limit", None)),
        EvalOptions(**options),
        progress,
    )
    assert progress.done == progress.total == result.num_examples
    return result


def _served_labels(
    registry: RegistryService, ref: str, requests: list[ClassifyRequest]
) -> list[int]:
    """What the runner answers one request at a time (a different batching than the eval's)."""
    manifest = registry.resolve(ref)
    spec = worker_spec_for(
        manifest, registry.model_dir(manifest), dtype="auto", device="cpu", cache_dir=Path("/tmp")
    )
    runner = create_runner(spec)
    runner.load()
    assert isinstance(runner, BatchRunner)
    labels = []
    for request in requests:
        (result,) = run_batch(runner, [request])
        assert isinstance(result, ClassifyResult)
        labels.append(int(np.frombuffer(result.probs, dtype="<f4").argmax()))
    return labels


def test_text_classification(eval_registry: RegistryService, tmp_path: Path) -> None:
    own = _served_labels(
        eval_registry,
        "tiny-cls",
        [ClassifyRequest(f"r{i}", texts=[t]) for i, t in enumerate(TEXTS)],
    )
    labels = eval_registry.resolve("tiny-cls").labels
    assert labels is not None
    rows = [
        {"text": t, "label": labels[y], "split": "test"} for t, y in zip(TEXTS, own, strict=True)
    ]
    rows.append({"text": "not in the split", "label": 0, "split": "train"})
    data = _write_jsonl(tmp_path / "cls.jsonl", rows)

    perfect = _run(eval_registry, "tiny-cls", data, "test", batch_size=3)
    assert perfect.num_examples == len(TEXTS)
    assert perfect.metrics["accuracy"] == 1.0
    assert perfect.metrics["f1_weighted"] == 1.0
    confusion = np.array(perfect.details["confusion_matrix"])
    assert confusion.trace() == len(TEXTS) and confusion.sum() == len(TEXTS)

    # Flip two labels (by index this time): accuracy drops by exactly 2/8.
    flipped = [dict(r) for r in rows[: len(TEXTS)]]
    for row in flipped[:2]:
        row["label"] = (labels.index(row["label"]) + 1) % len(labels)
    worse = _run(eval_registry, "tiny-cls", _write_jsonl(tmp_path / "flip.jsonl", flipped))
    assert worse.metrics["accuracy"] == pytest.approx(6 / 8)
    assert worse.split == ""
    assert worse.dataset_digest != perfect.dataset_digest

    limited = _run(eval_registry, "tiny-cls", data, "test", limit=3)
    assert limited.num_examples == 3


def test_image_classification(eval_registry: RegistryService, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
        path = tmp_path / f"img{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    own = _served_labels(
        eval_registry,
        "tiny-img",
        [ClassifyRequest(f"r{i}", images=[p.read_bytes()]) for i, p in enumerate(paths)],
    )
    rows = [{"image": p.name, "label": y} for p, y in zip(paths, own, strict=True)]
    result = _run(eval_registry, "tiny-img", _write_jsonl(tmp_path / "img.jsonl", rows))
    assert result.metrics["accuracy"] == 1.0
    assert result.details["labels"] == eval_registry.resolve("tiny-img").labels


def test_embedding_retrieval(eval_registry: RegistryService, tmp_path: Path) -> None:
    rows = [{"query": t, "positive": t, "negatives": ["unrelated words here"]} for t in TEXTS[:5]]
    result = _run(eval_registry, "tiny-embed", _write_jsonl(tmp_path / "emb.jsonl", rows))
    # Each query is its own positive: cosine 1, ranked first whatever the weights.
    assert result.metrics["recall@1"] == 1.0
    assert result.metrics["mrr"] == 1.0
    assert result.details["num_documents"] == 6


def test_seq2seq_and_chat_generation(eval_registry: RegistryService, tmp_path: Path) -> None:
    rows = [{"input": t, "reference": t} for t in TEXTS[:4]]
    result = _run(
        eval_registry, "tiny-t5", _write_jsonl(tmp_path / "s2s.jsonl", rows), max_new_tokens=8
    )
    assert set(result.metrics) == {"exact_match", "bleu", "rouge_l"}
    assert all(0.0 <= v <= 1.0 for v in result.metrics.values())
    predictions = [s["prediction"] for s in result.details["samples"]]
    # Scoring the model's own outputs as references must give a perfect score.
    own = [{"input": t, "reference": p} for t, p in zip(TEXTS[:4], predictions, strict=True)]
    again = _run(
        eval_registry, "tiny-t5", _write_jsonl(tmp_path / "own.jsonl", own), max_new_tokens=8
    )
    assert again.metrics["exact_match"] == 1.0 and again.metrics["rouge_l"] == 1.0

    chat = [{"messages": [{"role": "user", "content": t}], "reference": "x"} for t in TEXTS[:3]] + [
        {"prompt": "hello", "reference": "y"}
    ]
    result = _run(
        eval_registry,
        "tiny-chat",
        _write_jsonl(tmp_path / "chat.jsonl", chat),
        max_new_tokens=4,
        batch_size=2,
    )
    assert result.num_examples == 4 and "bleu" in result.metrics


def test_perplexity_on_a_text_file(eval_registry: RegistryService, tmp_path: Path) -> None:
    text = tmp_path / "corpus.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    result = _run(eval_registry, "tiny-chat", text)
    vocab = 300  # a random model is about uniform over its vocabulary (byte BPE + specials)
    assert 1.0 < result.metrics["perplexity"] < 10 * vocab
    assert result.metrics["perplexity"] == pytest.approx(math.exp(result.metrics["nll_per_token"]))
    rows = [{"text": "hello world"}, {"text": "another line of text"}]
    jsonl = _run(eval_registry, "tiny-chat", _write_jsonl(tmp_path / "ppl.jsonl", rows))
    assert jsonl.num_examples == 2 and jsonl.metrics["perplexity"] > 1.0


def _batch_runner(registry: RegistryService, ref: str) -> BatchRunner:
    manifest = registry.resolve(ref)
    spec = worker_spec_for(
        manifest, registry.model_dir(manifest), dtype="auto", device="cpu", cache_dir=Path("/tmp")
    )
    runner = create_runner(spec)
    runner.load()
    assert isinstance(runner, BatchRunner)
    return runner


def test_rerank(eval_registry: RegistryService, tmp_path: Path) -> None:
    queries = TEXTS[:4]
    documents = [TEXTS[4:], TEXTS[3:7], TEXTS[1:5], TEXTS[:4]]
    runner = _batch_runner(eval_registry, "tiny-rerank")
    served = []
    for i, (query, docs) in enumerate(zip(queries, documents, strict=True)):
        (result,) = run_batch(runner, [RerankRequest(f"r{i}", query, docs)])
        assert isinstance(result, ScoreResult)
        served.append(result.scores)
    best = [int(np.argmax(s)) for s in served]
    worst = [int(np.argmin(s)) for s in served]

    def rows(pick: list[int]) -> list[dict[str, Any]]:
        """The same choice in each accepted shape: indices, ids, graded labels."""
        out: list[dict[str, Any]] = []
        for i, (query, docs) in enumerate(zip(queries, documents, strict=True)):
            if i == 1:
                objects = [{"id": f"d{n}", "text": d} for n, d in enumerate(docs)]
                out.append({"query": query, "documents": objects, "relevant": [f"d{pick[i]}"]})
            elif i == 2:
                labels = [2 if n == pick[i] else 0 for n in range(len(docs))]
                out.append({"query": query, "documents": docs, "labels": labels})
            else:
                out.append({"query": query, "documents": docs, "relevant": [pick[i]]})
        return out

    perfect = _run(eval_registry, "tiny-rerank", _write_jsonl(tmp_path / "r.jsonl", rows(best)))
    assert perfect.task == "rerank"
    for name in ("mrr", "ndcg@1", "ndcg@5", "recall@1", "recall@5"):
        assert perfect.metrics[name] == pytest.approx(1.0), name
    assert perfect.details["num_documents"] == 16
    manifest = eval_registry.resolve("tiny-rerank")
    store(eval_registry, manifest, perfect)
    assert {m.metric for m in eval_registry.metrics(manifest)} >= {"mrr", "ndcg@5", "recall@1"}
    # The least relevant by the model's own scores: rank 4 of 4 everywhere.
    last = _run(eval_registry, "tiny-rerank", _write_jsonl(tmp_path / "w.jsonl", rows(worst)))
    assert last.metrics["mrr"] == pytest.approx(1 / 4)
    assert last.metrics["recall@1"] == 0.0 and last.metrics["recall@5"] == 1.0
    assert last.metrics["ndcg@5"] == pytest.approx(1 / math.log2(5))


def _chirp_wav(path: Path, seconds: float, low_hz: float) -> Path:
    t = np.arange(int(seconds * 16000)) / 16000
    samples = 0.4 * np.sin(2 * np.pi * (low_hz + 300 * t) * t)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes((samples * 32767).astype("<i2").tobytes())
    return path


def test_speech_to_text(eval_registry: RegistryService, tmp_path: Path) -> None:
    audio = [_chirp_wav(tmp_path / f"a{i}.wav", 1.0 + i / 2, 200 + 100 * i) for i in range(3)]
    runner = _batch_runner(eval_registry, "tiny-whisper")
    served = []
    for i, path in enumerate(audio):
        request = TranscribeRequest(f"s{i}", path.read_bytes(), language="en", timestamps=False)
        (result,) = run_batch(runner, [request])
        assert isinstance(result, TranscriptionResult)
        served.append(result.text)
    # Random weights: the "transcripts" are arbitrary (often empty), so the check is that the
    # evaluation scores exactly what the runner serves, against the references given.
    references = [t if transcript_words(t) else "filler words" for t in served]
    rows = [
        {"audio": p.name, "reference": r, "language": "en"}
        for p, r in zip(audio, references, strict=True)
    ]
    own = _run(
        eval_registry, "tiny-whisper", _write_jsonl(tmp_path / "s.jsonl", rows), batch_size=2
    )
    assert own.task == "speech-to-text"
    assert own.metrics == pytest.approx(error_rates(served, references))
    assert own.details["audio_seconds"] == pytest.approx(1.0 + 1.5 + 2.0)
    assert [s["prediction"] for s in own.details["samples"]] == served

    other = [{"audio": p.name, "text": "alpha beta gamma", "language": "en"} for p in audio]
    scored = _run(eval_registry, "tiny-whisper", _write_jsonl(tmp_path / "o.jsonl", other))
    assert scored.metrics == pytest.approx(error_rates(served, ["alpha beta gamma"] * 3))


def test_results_are_stored_on_the_version(eval_registry: RegistryService, tmp_path: Path) -> None:
    rows = [{"query": t, "positive": t} for t in TEXTS[:3]]
    result = _run(eval_registry, "tiny-embed", _write_jsonl(tmp_path / "e.jsonl", rows))
    manifest = eval_registry.resolve("tiny-embed")
    before = len(eval_registry.metrics(manifest))
    store(eval_registry, manifest, result)
    stored = eval_registry.metrics(manifest)[before:]
    assert {m.metric: m.value for m in stored} == result.metrics
    assert {(m.dataset_digest, m.num_examples) for m in stored} == {(result.dataset_digest, 3)}


@pytest.mark.parametrize(
    ("model", "rows", "message"),
    [
        ("tiny-cls", [{"text": "a", "label": "nope"}], "line 1: label 'nope'"),
        ("tiny-cls", [{"label": 0}], "line 1: missing field 'text'"),
        ("tiny-cls", [{"text": 5, "label": 0}], "'text' must be a str"),
        ("tiny-img", [{"image": "missing.png", "label": 0}], "image 'missing.png' not found"),
        ("tiny-embed", [{"query": "q"}], "missing field 'positive'"),
        ("tiny-t5", [{"input": "q"}], "missing field 'reference' or 'target'"),
        ("tiny-rerank", [{"query": "q", "documents": ["a"]}], "'labels' or 'relevant'"),
        ("tiny-rerank", [{"query": "q", "documents": ["a"], "relevant": [3]}], "names \\[3\\]"),
        ("tiny-rerank", [{"query": "q", "documents": ["a", "b"], "labels": [0, 0]}], "no relevant"),
        ("tiny-rerank", [{"query": "q", "documents": ["a"], "labels": [1, 0]}], "one relevance"),
        ("tiny-whisper", [{"audio": "missing.wav", "reference": "x"}], "'missing.wav' not found"),
        ("tiny-whisper", [{"audio": "a.wav"}], "missing field 'reference' or 'text'"),
    ],
)
def test_bad_examples_name_their_line(
    eval_registry: RegistryService,
    tmp_path: Path,
    model: str,
    rows: list[dict[str, Any]],
    message: str,
) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        _run(eval_registry, model, _write_jsonl(tmp_path / "bad.jsonl", rows))


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="not a file"):
        load_eval_data(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(InvalidRequestError, match="line 2: not JSON"):
        load_eval_data(bad)
    good = _write_jsonl(tmp_path / "good.jsonl", [{"text": "a", "split": "train"}])
    with pytest.raises(InvalidRequestError, match=r"no row of good\.jsonl has split 'test'"):
        load_eval_data(good, "test")
    with pytest.raises(InvalidRequestError, match="limit"):
        load_eval_data(good, None, 0)


def test_unsupported_task(eval_registry: RegistryService, tmp_path: Path) -> None:
    data = load_eval_data(_write_jsonl(tmp_path / "x.jsonl", [{"text": "a"}]))
    info = ModelInfo(context_length=8, dtype="float32", device="cpu")
    runner = create_runner(
        worker_spec_for(
            eval_registry.resolve("tiny-cls"),
            eval_registry.model_dir(eval_registry.resolve("tiny-cls")),
            dtype="auto",
            device="cpu",
            cache_dir=tmp_path,
        )
    )
    with pytest.raises(NotSupportedError, match="no evaluation for tensor"):
        evaluate_with_runner(runner, info, Task.TENSOR, data, EvalOptions(), lambda _: None)
