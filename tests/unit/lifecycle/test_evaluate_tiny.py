"""The evaluation pipeline on tiny random-weight models.

The numbers are meaningless (random weights); what is checked is the pipeline: the model runs
through the worker's runners, its predictions are scored right (labels built from the model's own
outputs must score 1.0, flipped ones exactly lower), and the results land on the version.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from lmaas.core.errors import InvalidRequestError, NotSupportedError
from lmaas.core.messages import ClassifyRequest, ClassifyResult, ModelInfo
from lmaas.core.types import Task
from lmaas.lifecycle.datasets import load_eval_data
from lmaas.lifecycle.eval_tasks import EvalOptions, evaluate_with_runner
from lmaas.lifecycle.evaluate import EvaluationResult, evaluate, store
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
    with pytest.raises(NotSupportedError, match="no evaluation for rerank"):
        evaluate_with_runner(runner, info, Task.RERANK, data, EvalOptions(), lambda _: None)
