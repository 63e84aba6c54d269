"""Rerank evaluation: each query's documents scored by the cross-encoder the worker runs, then
MRR, nDCG@k and recall@k against the relevance the data gives.

A row: ``query``; ``documents``, a list of texts or of ``{"id": ..., "text": ...}`` objects; and
either ``labels`` (one graded relevance per document, 0 = not relevant) or ``relevant`` (the
relevant documents: their ``id`` when the documents carry ids, else their 0-based index).
"""

from __future__ import annotations

from dataclasses import dataclass

from lmaas.core.errors import InvalidRequestError
from lmaas.core.messages import InferRequest, RerankRequest, ScoreResult
from lmaas.lifecycle import metrics as m
from lmaas.lifecycle.datasets import EvalData, field_of
from lmaas.lifecycle.eval_common import EvalOptions, Progress, TaskScores, infer_all
from lmaas.runtimes.base import BatchRunner


@dataclass(slots=True, frozen=True)
class RerankExample:
    """One query, its documents' texts, and each document's relevance."""

    query: str
    documents: list[str]
    relevance: list[float]


def evaluate_rerank(
    runner: BatchRunner, data: EvalData, options: EvalOptions, progress: Progress
) -> TaskScores:
    """Score every query's documents, then rank them by score (ties: input order last)."""
    examples = [rerank_example(data, i) for i in range(len(data.rows))]
    requests: list[InferRequest] = [
        RerankRequest(f"eval-{i}", e.query, e.documents) for i, e in enumerate(examples)
    ]
    scores = []
    for result in infer_all(runner, requests, data, options, progress):
        assert isinstance(result, ScoreResult)
        scores.append(result.scores)
    metrics = m.ranking_metrics(scores, [e.relevance for e in examples], options.ks)
    num_documents = sum(len(e.documents) for e in examples)
    return TaskScores(
        metrics,
        {"num_documents": num_documents, "documents_per_query": num_documents / len(examples)},
    )


def rerank_example(data: EvalData, index: int) -> RerankExample:
    """Example ``index``, checked.

    Raises:
        InvalidRequestError: A missing or malformed field, or no relevant document (the message
            names the line).
    """
    where = data.where(index)
    query = field_of(data, index, "query")
    raw = field_of(data, index, "documents", kind=list)
    if not query.strip() or not raw:
        raise InvalidRequestError(f"{where}: needs a non-empty 'query' and 'documents'")
    ids: list[object] | None = None
    if all(isinstance(d, str) for d in raw):
        texts = list(raw)
    elif all(isinstance(d, dict) and isinstance(d.get("text"), str) for d in raw):
        texts = [d["text"] for d in raw]
        ids = [d.get("id", n) for n, d in enumerate(raw)]
    else:
        raise InvalidRequestError(
            f'{where}: documents must all be strings or all {{"id": ..., "text": ...}} objects'
        )
    if "labels" in data.rows[index]:
        relevance = _labels(data, index, len(texts))
    else:
        relevance = _relevant(data, index, ids if ids is not None else list(range(len(texts))))
    if not any(r > 0 for r in relevance):
        raise InvalidRequestError(f"{where}: no relevant document (every label is 0)")
    return RerankExample(query, texts, relevance)


def _labels(data: EvalData, index: int, num_documents: int) -> list[float]:
    labels = field_of(data, index, "labels", kind=list)
    numeric = all(isinstance(x, int | float) and not isinstance(x, bool) for x in labels)
    if len(labels) != num_documents or not numeric or any(x < 0 for x in labels):
        raise InvalidRequestError(
            f"{data.where(index)}: 'labels' must hold one relevance >= 0 per document "
            f"({num_documents})"
        )
    return [float(x) for x in labels]


def _relevant(data: EvalData, index: int, ids: list[object]) -> list[float]:
    relevant = field_of(data, index, "relevant", kind=list)
    unknown = [r for r in relevant if r not in ids or isinstance(r, bool)]
    if unknown:
        raise InvalidRequestError(
            f"{data.where(index)}: 'relevant' names {unknown[:3]!r}, not among the documents' "
            "ids (0-based indices when the documents are plain strings)"
        )
    return [1.0 if i in relevant else 0.0 for i in ids]
