"""Evaluation metrics in plain numpy: classification, text overlap, retrieval, ranking,
transcription error rates, perplexity.

No scikit-learn, NLTK or sacrebleu at run time (and no data downloads); the unit tests check
these functions against hand-computed values and against scikit-learn where it is installed.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(slots=True, frozen=True)
class ClassReport:
    """Precision, recall and F1 of one class, and how many examples it has (support)."""

    label: str
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(slots=True, frozen=True)
class ClassificationReport:
    """Scores of a classifier on a labelled set.

    ``precision``/``recall``/``f1`` come ``macro`` (unweighted mean over the classes present in
    the references or predictions) and ``weighted`` (weighted by support). A class never
    predicted has precision 0 (scikit-learn's ``zero_division=0``).
    """

    accuracy: float
    macro: tuple[float, float, float]
    weighted: tuple[float, float, float]
    per_class: list[ClassReport]
    confusion: list[list[int]]
    """``confusion[i][j]``: examples of class ``labels[i]`` predicted as ``labels[j]``."""
    labels: list[str]

    def scalars(self) -> dict[str, float]:
        """The headline numbers, as stored on the version."""
        return {
            "accuracy": self.accuracy,
            "precision_macro": self.macro[0],
            "recall_macro": self.macro[1],
            "f1_macro": self.macro[2],
            "precision_weighted": self.weighted[0],
            "recall_weighted": self.weighted[1],
            "f1_weighted": self.weighted[2],
        }


def _safe_div(
    num: npt.NDArray[np.float64], den: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    out = np.zeros_like(num, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def classification_report(
    y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]
) -> ClassificationReport:
    """Accuracy, macro/weighted precision, recall and F1, per-class scores, confusion matrix.

    Args:
        y_true: Reference class indices into ``labels``.
        y_pred: Predicted class indices into ``labels``.
        labels: Class names.

    Raises:
        ValueError: Empty or unequal inputs, or an index outside ``labels``.
    """
    if len(y_true) != len(y_pred) or not y_true:
        raise ValueError("y_true and y_pred must be non-empty and of equal length")
    num_classes = len(labels)
    true, pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if true.min() < 0 or pred.min() < 0 or max(true.max(), pred.max()) >= num_classes:
        raise ValueError("class index outside the labels")
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (true, pred), 1)
    tp = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1).astype(np.float64)
    predicted = confusion.sum(axis=0).astype(np.float64)
    precision, recall = _safe_div(tp, predicted), _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    present = (support > 0) | (predicted > 0)  # scikit-learn averages over labels that occur
    weights = support / support.sum()

    def macro(values: npt.NDArray[np.float64]) -> float:
        return float(values[present].mean())

    return ClassificationReport(
        accuracy=float(tp.sum() / len(true)),
        macro=(macro(precision), macro(recall), macro(f1)),
        weighted=(
            float((precision * weights).sum()),
            float((recall * weights).sum()),
            float((f1 * weights).sum()),
        ),
        per_class=[
            ClassReport(label, float(p), float(r), float(f), int(s))
            for label, p, r, f, s in zip(labels, precision, recall, f1, support, strict=True)
        ],
        confusion=confusion.tolist(),
        labels=list(labels),
    )


_SPACE_RE = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Lower-case, trimmed, runs of whitespace as one space (for exact match)."""
    return _SPACE_RE.sub(" ", text.strip().lower())


def tokenize(text: str) -> list[str]:
    """Whitespace tokens of :func:`normalize_text` (BLEU and ROUGE-L compare these)."""
    normalized = normalize_text(text)
    return normalized.split(" ") if normalized else []


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference after :func:`normalize_text`."""
    _check_pairs(predictions, references)
    pairs = zip(predictions, references, strict=True)
    hits = sum(normalize_text(p) == normalize_text(r) for p, r in pairs)
    return hits / len(predictions)


def _ngrams(tokens: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(predictions: Sequence[str], references: Sequence[str], max_order: int = 4) -> float:
    """Corpus BLEU (Papineni et al. 2002) on whitespace tokens, one reference each, in [0, 1].

    Clipped n-gram counts and lengths are summed over the corpus before the geometric mean and
    the brevity penalty, as sacreBLEU does; no smoothing, so a corpus without a single matching
    ``max_order``-gram scores 0.
    """
    _check_pairs(predictions, references)
    matches, totals = [0] * max_order, [0] * max_order
    hyp_len = ref_len = 0
    for prediction, reference in zip(predictions, references, strict=True):
        hyp, ref = tokenize(prediction), tokenize(reference)
        hyp_len, ref_len = hyp_len + len(hyp), ref_len + len(ref)
        for n in range(1, max_order + 1):
            hyp_ngrams, ref_ngrams = _ngrams(hyp, n), _ngrams(ref, n)
            matches[n - 1] += sum((hyp_ngrams & ref_ngrams).values())
            totals[n - 1] += max(len(hyp) - n + 1, 0)
    if hyp_len == 0 or min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals, strict=True)) / max_order
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return brevity * math.exp(log_precision)


def _lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 (longest common subsequence of whitespace tokens, beta = 1)."""
    _check_pairs(predictions, references)
    scores = []
    for prediction, reference in zip(predictions, references, strict=True):
        hyp, ref = tokenize(prediction), tokenize(reference)
        lcs = _lcs_length(hyp, ref)
        if lcs == 0:
            scores.append(0.0)
            continue
        precision, recall = lcs / len(hyp), lcs / len(ref)
        scores.append(2 * precision * recall / (precision + recall))
    return sum(scores) / len(scores)


def retrieval_metrics(
    queries: npt.NDArray[np.float32],
    documents: npt.NDArray[np.float32],
    positives: Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@k and MRR of each query's positive document among all documents (cosine).

    Args:
        queries: ``[num_queries, dim]`` query embeddings.
        documents: ``[num_documents, dim]`` document embeddings.
        positives: For each query, the row of its positive document.
        ks: Cut-offs of recall@k.

    Returns:
        ``recall@k`` for each k and ``mrr``. Ties rank the positive after its equals.
    """
    if len(queries) != len(positives) or not len(queries):
        raise ValueError("one positive per query, and at least one query")
    q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    d = documents / np.maximum(np.linalg.norm(documents, axis=1, keepdims=True), 1e-12)
    scores = q @ d.T
    rows = np.arange(len(positives))
    positive_scores = scores[rows, np.asarray(positives)]
    ranks = (scores >= positive_scores[:, None]).sum(axis=1)  # 1 = best
    out = {f"recall@{k}": float((ranks <= k).mean()) for k in ks}
    out["mrr"] = float((1.0 / ranks).mean())
    return out


def ranking_metrics(
    scores: Sequence[Sequence[float]],
    relevance: Sequence[Sequence[float]],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """MRR, nDCG@k and recall@k of scored document lists (a reranker's output), averaged over
    the queries.

    Args:
        scores: For each query, one score per document (higher ranks first).
        relevance: For each query, the graded relevance of each document (0: not relevant);
            every query needs at least one relevant document.
        ks: Cut-offs of nDCG@k and recall@k.

    Returns:
        ``mrr`` (1 / rank of the first relevant document), ``ndcg@k`` (linear gains
        ``rel / log2(rank + 1)`` over the ideal order's, as scikit-learn's ``ndcg_score`` and
        trec_eval), ``recall@k`` (share of the relevant documents in the top k). Ties rank the
        more relevant documents after their equals.
    """
    if len(scores) != len(relevance) or not scores:
        raise ValueError("one relevance list per score list, and at least one query")
    sums = dict.fromkeys(["mrr", *(f"ndcg@{k}" for k in ks), *(f"recall@{k}" for k in ks)], 0.0)
    for query_scores, query_rels in zip(scores, relevance, strict=True):
        if len(query_scores) != len(query_rels) or not any(r > 0 for r in query_rels):
            raise ValueError("one relevance per document, and a relevant document per query")
        order = sorted(range(len(query_scores)), key=lambda i: (-query_scores[i], query_rels[i]))
        ranked = [float(query_rels[i]) for i in order]
        ideal = sorted(ranked, reverse=True)
        sums["mrr"] += 1.0 / (next(n for n, r in enumerate(ranked) if r > 0) + 1)
        num_relevant = sum(r > 0 for r in ranked)
        for k in ks:
            sums[f"ndcg@{k}"] += _dcg(ranked[:k]) / _dcg(ideal[:k])
            sums[f"recall@{k}"] += sum(r > 0 for r in ranked[:k]) / num_relevant
    return {name: total / len(scores) for name, total in sums.items()}


def _dcg(gains: Sequence[float]) -> float:
    return sum(g / math.log2(rank + 2) for rank, g in enumerate(gains))


_WORD_RE = re.compile(r"[\w']+")


def transcript_words(text: str) -> list[str]:
    """Lower-cased words without punctuation (``"Dog, please."`` → ``["dog", "please"]``):
    what WER and CER compare, so casing and punctuation are not counted as errors."""
    return _WORD_RE.findall(text.lower())


def edit_distance(a: Sequence[object], b: Sequence[object]) -> int:
    """Levenshtein distance: the fewest substitutions, deletions and insertions from a to b.

    One numpy pass per item of ``a``: a row's insertions are a running minimum
    (``row[j] = j + min over l <= j of (partial[l] - l)``), so long transcripts stay fast.
    """
    if not a or not b:
        return max(len(a), len(b))
    vocabulary: dict[object, int] = {}
    a_ids = [vocabulary.setdefault(item, len(vocabulary)) for item in a]
    b_ids = np.array([vocabulary.setdefault(item, len(vocabulary)) for item in b])
    columns = np.arange(len(b) + 1)
    previous = columns.copy()
    for i, item in enumerate(a_ids, start=1):
        partial = np.empty_like(previous)
        partial[0] = i
        # Deletion (from above) or substitution/match (from the diagonal); insertions next.
        partial[1:] = np.minimum(previous[1:] + 1, previous[:-1] + (b_ids != item))
        previous = np.minimum.accumulate(partial - columns) + columns
    return int(previous[-1])


def error_rates(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus word and character error rates of transcriptions against references.

    ``wer`` = word edits / reference words, ``cer`` = character edits / reference characters,
    each summed over the corpus (as jiwer does), after :func:`transcript_words` (characters: the
    words joined by single spaces). Both can exceed 1 when a prediction inserts a lot.
    """
    _check_pairs(predictions, references)
    word_edits = word_total = char_edits = char_total = 0
    for prediction, reference in zip(predictions, references, strict=True):
        hyp, ref = transcript_words(prediction), transcript_words(reference)
        word_edits += edit_distance(hyp, ref)
        word_total += len(ref)
        hyp_chars, ref_chars = " ".join(hyp), " ".join(ref)
        char_edits += edit_distance(hyp_chars, ref_chars)
        char_total += len(ref_chars)
    if word_total == 0:
        raise ValueError("the references hold no words")
    return {"wer": word_edits / word_total, "cer": char_edits / char_total}


def perplexity(total_nll: float, num_tokens: int) -> float:
    """``exp(mean negative log-likelihood per predicted token)``."""
    if num_tokens <= 0:
        raise ValueError("perplexity needs at least one predicted token")
    return math.exp(total_nll / num_tokens)


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references) or not predictions:
        raise ValueError("one reference per prediction, and at least one of each")
