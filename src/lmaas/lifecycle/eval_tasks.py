"""Run a model over evaluation data with the worker's own runners, one function per task.

Batch tasks go through :func:`lmaas.runtimes.batching.run_batch` (preprocess → forward in
batches → postprocess, the worker's path without its threads); generative tasks through the
runner's step loop, greedy. So the predictions are those the server would return. Rerank and
speech-to-text live in :mod:`~lmaas.lifecycle.eval_rerank` and :mod:`~lmaas.lifecycle.eval_speech`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lmaas.core.errors import InvalidRequestError, NotSupportedError
from lmaas.core.messages import (
    ChatMessage,
    ClassifyRequest,
    ClassifyResult,
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    InferRequest,
    ModelInfo,
    SamplingParams,
)
from lmaas.core.types import Task
from lmaas.lifecycle import metrics as m
from lmaas.lifecycle.datasets import EvalData, field_of
from lmaas.lifecycle.eval_common import EvalOptions, Progress, TaskScores, infer_all
from lmaas.lifecycle.eval_rerank import evaluate_rerank
from lmaas.lifecycle.eval_speech import evaluate_speech
from lmaas.runtimes.base import BatchRunner, GenerationRunner, Runner

__all__ = ["EvalOptions", "Progress", "TaskScores", "check_examples", "evaluate_with_runner"]


def evaluate_classification(
    runner: BatchRunner,
    info: ModelInfo,
    data: EvalData,
    options: EvalOptions,
    progress: Progress,
    *,
    images: bool,
) -> TaskScores:
    """Accuracy, precision/recall/F1 (macro and weighted), per-class report, confusion."""
    labels = list(info.labels or [])
    if not labels:
        raise InvalidRequestError("the model reports no class labels; it cannot be scored")
    targets = [_label_index(data, i, labels) for i in range(len(data.rows))]
    requests: list[InferRequest] = []
    for i in range(len(data.rows)):
        if images:
            path = field_of(data, i, "image")
            image = (data.path.parent / path).expanduser()
            if not image.is_file():
                raise InvalidRequestError(f"{data.where(i)}: image {path!r} not found")
            requests.append(ClassifyRequest(f"eval-{i}", images=[image.read_bytes()]))
        else:
            requests.append(ClassifyRequest(f"eval-{i}", texts=[field_of(data, i, "text")]))
    predictions = []
    for result in infer_all(runner, requests, data, options, progress):
        assert isinstance(result, ClassifyResult)
        probs = np.frombuffer(result.probs, dtype="<f4").reshape(result.num_inputs, -1)
        predictions.append(int(probs[0].argmax()))
    report = m.classification_report(targets, predictions, labels)
    return TaskScores(
        report.scalars(),
        {
            "labels": report.labels,
            "confusion_matrix": report.confusion,
            "per_class": [
                {
                    "label": c.label,
                    "precision": c.precision,
                    "recall": c.recall,
                    "f1": c.f1,
                    "support": c.support,
                }
                for c in report.per_class
            ],
        },
    )


def _label_index(data: EvalData, index: int, labels: list[str]) -> int:
    value = data.rows[index].get("label")
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(labels):
        return value
    if isinstance(value, str) and value in labels:
        return labels.index(value)
    raise InvalidRequestError(
        f"{data.where(index)}: label {value!r} is neither one of the model's labels "
        f"{labels[:10]} nor an index below {len(labels)}"
    )


def evaluate_embedding(
    runner: BatchRunner, data: EvalData, options: EvalOptions, progress: Progress
) -> TaskScores:
    """Recall@k and MRR of each query's positive among every positive and negative."""
    queries = [field_of(data, i, "query") for i in range(len(data.rows))]
    corpus: dict[str, int] = {}
    positives = []
    for i in range(len(data.rows)):
        positives.append(corpus.setdefault(field_of(data, i, "positive"), len(corpus)))
        for negative in (
            field_of(data, i, "negatives", kind=list) if "negatives" in data.rows[i] else []
        ):
            if not isinstance(negative, str):
                raise InvalidRequestError(f"{data.where(i)}: negatives must be strings")
            corpus.setdefault(negative, len(corpus))
    query_vecs = _embed(runner, queries, data, options, progress)
    doc_vecs = _embed(runner, list(corpus), data, options, lambda _: None)
    scores = m.retrieval_metrics(query_vecs, doc_vecs, positives, options.ks)
    return TaskScores(scores, {"num_documents": len(corpus)})


def _embed(
    runner: BatchRunner,
    texts: list[str],
    data: EvalData,
    options: EvalOptions,
    progress: Progress,
) -> np.ndarray[Any, np.dtype[np.float32]]:
    requests: list[InferRequest] = [
        EmbedRequest(f"eval-{i}", texts=texts[i : i + options.batch_size])
        for i in range(0, len(texts), options.batch_size)
    ]
    vectors = []
    for result in infer_all(runner, requests, data, EvalOptions(batch_size=1), lambda _: None):
        assert isinstance(result, EmbedResult)
        vectors.append(np.frombuffer(result.data, dtype="<f4").reshape(result.num_inputs, -1))
        progress(result.num_inputs)
    return np.concatenate(vectors)


def evaluate_generation(
    runner: GenerationRunner,
    task: Task,
    data: EvalData,
    options: EvalOptions,
    progress: Progress,
) -> TaskScores:
    """Greedy outputs scored against ``reference``: exact match, BLEU, ROUGE-L."""
    requests = [_generate_request(task, data, i, options) for i in range(len(data.rows))]
    references = [field_of(data, i, "reference", "target") for i in range(len(data.rows))]
    outputs = run_generation(runner, requests, data, options.batch_size, progress)
    predictions = [outputs[r.request_id] for r in requests]
    scores = {
        "exact_match": m.exact_match(predictions, references),
        "bleu": m.corpus_bleu(predictions, references),
        "rouge_l": m.rouge_l(predictions, references),
    }
    samples = [
        {"prediction": p, "reference": r}
        for p, r in zip(predictions[:5], references[:5], strict=True)
    ]
    return TaskScores(scores, {"samples": samples, "max_new_tokens": options.max_new_tokens})


def _generate_request(task: Task, data: EvalData, i: int, options: EvalOptions) -> GenerateRequest:
    sampling = SamplingParams(max_tokens=options.max_new_tokens, temperature=0.0)
    row = data.rows[i]
    if task is Task.CHAT and "messages" in row:
        messages = field_of(data, i, "messages", kind=list)
        try:
            chat = [ChatMessage(str(x["role"]), str(x["content"])) for x in messages]
        except (TypeError, KeyError):
            raise InvalidRequestError(
                f"{data.where(i)}: messages must be objects with role and content"
            ) from None
        return GenerateRequest(f"eval-{i}", sampling, messages=chat)
    prompt = field_of(data, i, "prompt", "input")
    if task is Task.CHAT:
        return GenerateRequest(f"eval-{i}", sampling, messages=[ChatMessage("user", prompt)])
    return GenerateRequest(f"eval-{i}", sampling, prompt=prompt)


def run_generation(
    runner: GenerationRunner,
    requests: list[GenerateRequest],
    data: EvalData,
    max_in_flight: int,
    progress: Progress,
) -> dict[str, str]:
    """Step the runner until every request finished; the text of each, by request id."""
    texts: dict[str, list[str]] = {r.request_id: [] for r in requests}
    index = {r.request_id: i for i, r in enumerate(requests)}
    pending = list(reversed(requests))
    in_flight = 0
    while pending or in_flight:
        while pending and in_flight < max(1, max_in_flight):
            request = pending.pop()
            try:
                runner.add_request(request)
            except InvalidRequestError as exc:
                where = data.where(index[request.request_id])
                raise InvalidRequestError(f"{where}: the model refused it: {exc.message}") from exc
            in_flight += 1
        for delta in runner.step():
            texts[delta.request_id].append(delta.text)
            if delta.finish_reason is not None:
                in_flight -= 1
                progress(1)
    return {rid: "".join(parts) for rid, parts in texts.items()}


_REQUIRED_FIELDS: dict[Task, tuple[tuple[str, ...], ...]] = {
    Task.CLASSIFICATION: (("text",), ("label",)),
    Task.IMAGE_CLASSIFICATION: (("image",), ("label",)),
    Task.EMBEDDING: (("query",), ("positive",)),
    Task.RERANK: (("query",), ("documents",), ("labels", "relevant")),
    Task.SPEECH_TO_TEXT: (("audio",), ("reference", "text")),
    Task.CHAT: (("messages", "prompt", "input"), ("reference", "target")),
    Task.COMPLETION: (("prompt", "input"), ("reference", "target")),
    Task.SEQ2SEQ: (("prompt", "input"), ("reference", "target")),
}


def check_examples(task: Task, data: EvalData) -> None:
    """Refuse data that misses a field the task needs, before any model is loaded.

    Raises:
        NotSupportedError: No evaluation for this task.
        InvalidRequestError: An example lacks a field (the message names its line).
    """
    required = _REQUIRED_FIELDS.get(task)
    if required is None:
        raise NotSupportedError(
            f"no evaluation for {task.value} models yet; supported: "
            + ", ".join(t.value for t in _REQUIRED_FIELDS)
        )
    for i, row in enumerate(data.rows):
        for names in required:
            if not any(name in row for name in names):
                wanted = " or ".join(repr(name) for name in names)
                raise InvalidRequestError(f"{data.where(i)}: missing field {wanted}")


def evaluate_with_runner(
    runner: Runner,
    info: ModelInfo,
    task: Task,
    data: EvalData,
    options: EvalOptions,
    progress: Progress,
) -> TaskScores:
    """Dispatch on the task.

    Raises:
        NotSupportedError: No evaluation for this task (yet).
    """
    if task in {Task.CLASSIFICATION, Task.IMAGE_CLASSIFICATION} and isinstance(runner, BatchRunner):
        images = task is Task.IMAGE_CLASSIFICATION
        return evaluate_classification(runner, info, data, options, progress, images=images)
    if task is Task.EMBEDDING and isinstance(runner, BatchRunner):
        return evaluate_embedding(runner, data, options, progress)
    if task is Task.RERANK and isinstance(runner, BatchRunner):
        return evaluate_rerank(runner, data, options, progress)
    if task is Task.SPEECH_TO_TEXT and isinstance(runner, BatchRunner):
        return evaluate_speech(runner, data, options, progress)
    if task in {Task.CHAT, Task.COMPLETION, Task.SEQ2SEQ} and isinstance(runner, GenerationRunner):
        return evaluate_generation(runner, task, data, options, progress)
    raise NotSupportedError(
        f"no evaluation for {task.value} models yet; supported: "
        + ", ".join(t.value for t in _REQUIRED_FIELDS)
    )
