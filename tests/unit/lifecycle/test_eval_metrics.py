"""Metric functions against hand-computed values, and against scikit-learn where installed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmaas.lifecycle.metrics import (
    classification_report,
    corpus_bleu,
    edit_distance,
    error_rates,
    exact_match,
    perplexity,
    ranking_metrics,
    retrieval_metrics,
    rouge_l,
)


def test_classification_by_hand() -> None:
    # true: a a a b b c ; pred: a a b b c c
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 1, 2, 2]
    report = classification_report(y_true, y_pred, ["a", "b", "c"])
    assert report.accuracy == pytest.approx(4 / 6)
    assert report.confusion == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    a, b, c = report.per_class
    # a: P = 2/2, R = 2/3; b: P = 1/2, R = 1/2; c: P = 1/2, R = 1/1
    assert (a.precision, a.recall, a.support) == (1.0, pytest.approx(2 / 3), 3)
    assert (b.precision, b.recall, b.f1) == (0.5, 0.5, 0.5)
    assert (c.precision, c.recall, c.f1) == (0.5, 1.0, pytest.approx(2 / 3))
    assert a.f1 == pytest.approx(0.8)
    assert report.macro[0] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert report.macro[2] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert report.weighted[1] == pytest.approx(report.accuracy)  # weighted recall = accuracy
    assert report.weighted[2] == pytest.approx((3 * 0.8 + 2 * 0.5 + 1 * 2 / 3) / 6)
    assert set(report.scalars()) == {
        "accuracy",
        "precision_macro",
        "recall_macro",
        "f1_macro",
        "precision_weighted",
        "recall_weighted",
        "f1_weighted",
    }


def test_classification_never_predicted_class_scores_zero() -> None:
    report = classification_report([0, 1, 2, 2], [0, 0, 0, 0], ["x", "y", "z"])
    assert [c.precision for c in report.per_class] == [0.25, 0.0, 0.0]
    assert report.accuracy == 0.25


def test_classification_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        classification_report([], [], ["a"])
    with pytest.raises(ValueError):
        classification_report([0, 3], [0, 0], ["a", "b"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_matches_scikit_learn(seed: int) -> None:
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    labels = ["l0", "l1", "l2", "l3", "l4"]
    # Class 4 never occurs in y_true, class 3 never predicted: both zero-division paths.
    y_true = rng.integers(0, 4, size=200).tolist()
    y_pred = [p if p != 3 else 4 for p in rng.integers(0, 5, size=200).tolist()]
    ours = classification_report(y_true, y_pred, labels)
    assert ours.accuracy == pytest.approx(sk.accuracy_score(y_true, y_pred))
    for average, got in (("macro", ours.macro), ("weighted", ours.weighted)):
        p, r, f, _ = sk.precision_recall_fscore_support(
            y_true, y_pred, average=average, zero_division=0
        )
        assert got == pytest.approx((p, r, f))
    p, r, f, s = sk.precision_recall_fscore_support(
        y_true, y_pred, labels=range(5), average=None, zero_division=0
    )
    assert [c.precision for c in ours.per_class] == pytest.approx(p)
    assert [c.recall for c in ours.per_class] == pytest.approx(r)
    assert [c.f1 for c in ours.per_class] == pytest.approx(f)
    assert [c.support for c in ours.per_class] == list(s)
    assert ours.confusion == sk.confusion_matrix(y_true, y_pred, labels=range(5)).tolist()


def test_exact_match_normalizes_case_and_spaces() -> None:
    assert exact_match(["Paris ", "a  b", "no"], ["paris", "A b", "yes"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        exact_match(["a"], [])


def test_bleu_by_hand() -> None:
    assert corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == 1.0
    assert corpus_bleu(["a b c"], ["x y z"]) == 0.0
    # hyp "the cat sat on mat" vs ref "the cat sat on the mat": p1 = 5/5, p2 = 3/4 (the cat,
    # cat sat, sat on; "on mat" misses), p3 = 2/3, p4 = 1/2; BP = exp(1 - 6/5).
    expected = math.exp(1 - 6 / 5) * (1 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert corpus_bleu(["the cat sat on mat"], ["the cat sat on the mat"]) == pytest.approx(
        expected
    )
    # Clipping: "the the the the" against "the cat": p1 = 1/4, no 2-gram match -> 0.
    assert corpus_bleu(["the the the the"], ["the cat"]) == 0.0


def test_bleu_matches_sacrebleu_formula_on_a_corpus() -> None:
    hyps = ["a b c d e", "f g h i"]
    refs = ["a b c d x", "f g h i j"]
    # 1-grams 8/9, 2-grams 6/7, 3-grams 4/5, 4-grams 2/3; hyp 9 < ref 10 tokens.
    expected = math.exp(1 - 10 / 9) * (8 / 9 * 6 / 7 * 4 / 5 * 2 / 3) ** 0.25
    assert corpus_bleu(hyps, refs) == pytest.approx(expected)


def test_rouge_l_by_hand() -> None:
    # LCS("a b c d", "a c d e") = "a c d" = 3: P = 3/4, R = 3/4, F = 0.75.
    assert rouge_l(["a b c d"], ["a c d e"]) == pytest.approx(0.75)
    # LCS("a b", "a b c d") = 2: P = 1, R = 1/2, F = 2/3; the mean with a miss (0).
    assert rouge_l(["a b", "x"], ["a b c d", "y"]) == pytest.approx((2 / 3) / 2)
    assert rouge_l([""], ["a"]) == 0.0


def test_retrieval_by_hand() -> None:
    docs = np.array([[1, 0], [0, 1], [1, 1]], dtype=np.float32)
    queries = np.array([[1, 0.1], [0.1, 1], [1, 0]], dtype=np.float32)
    # q0 -> doc0 rank 1; q1 -> doc1 rank 1; q2 wants doc1 (cos 0), ranked after doc0, doc2: 3.
    scores = retrieval_metrics(queries, docs, [0, 1, 1], ks=(1, 2, 3))
    assert scores["recall@1"] == pytest.approx(2 / 3)
    assert scores["recall@2"] == pytest.approx(2 / 3)
    assert scores["recall@3"] == 1.0
    assert scores["mrr"] == pytest.approx((1 + 1 + 1 / 3) / 3)


def test_perplexity() -> None:
    assert perplexity(10 * math.log(4), 10) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        perplexity(1.0, 0)


def test_ranking_by_hand() -> None:
    # Query 1: the relevant document (index 2) ranks 2nd. Query 2: graded, perfect order.
    got = ranking_metrics(
        [[0.1, 0.9, 0.5], [3.0, 2.0, 1.0]],
        [[0, 0, 1], [2, 1, 0]],
        ks=(1, 2),
    )
    assert got["mrr"] == pytest.approx((1 / 2 + 1) / 2)
    assert got["recall@1"] == pytest.approx((0 + 1 / 2) / 2)
    assert got["recall@2"] == pytest.approx((1 + 1) / 2)
    ndcg_q1_at2 = (1 / math.log2(3)) / 1.0
    assert got["ndcg@1"] == pytest.approx((0 + 1) / 2)
    assert got["ndcg@2"] == pytest.approx((ndcg_q1_at2 + 1) / 2)
    # Ties rank the relevant document after its equals (a constant model earns nothing).
    tied = ranking_metrics([[1.0, 1.0, 1.0]], [[1, 0, 0]], ks=(1,))
    assert tied["mrr"] == pytest.approx(1 / 3) and tied["recall@1"] == 0.0
    with pytest.raises(ValueError, match="relevant document"):
        ranking_metrics([[1.0, 2.0]], [[0, 0]])
    with pytest.raises(ValueError, match="one relevance"):
        ranking_metrics([[1.0, 2.0]], [[1]])


@pytest.mark.parametrize("seed", [0, 1])
def test_ndcg_matches_scikit_learn(seed: int) -> None:
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    scores = rng.random((20, 8))  # continuous: no ties
    relevance = rng.integers(0, 4, size=(20, 8))
    relevance[:, 0] = np.maximum(relevance[:, 0], 1)  # a relevant document per query
    got = ranking_metrics(scores.tolist(), relevance.tolist(), ks=(3, 8))
    for k in (3, 8):
        assert got[f"ndcg@{k}"] == pytest.approx(sk.ndcg_score(relevance, scores, k=k))


def test_edit_distance_and_error_rates_by_hand() -> None:
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance([], ["a", "b"]) == 2
    assert edit_distance(["a", "b", "c"], ["a", "c"]) == 1
    # "the cat sat" vs "the cat sat down": one insertion in 3 words; "Dog, please." vs
    # "dog please": casing and punctuation do not count.
    rates = error_rates(["the cat sat down", "Dog, please."], ["The cat sat", "dog please"])
    assert rates["wer"] == pytest.approx(1 / 5)
    assert rates["cer"] == pytest.approx(len(" down") / (len("the cat sat") + len("dog please")))
    assert error_rates(["über café"], ["Über café"]) == {"wer": 0.0, "cer": 0.0}
    assert error_rates([""], ["two words"])["wer"] == 1.0
    with pytest.raises(ValueError, match="no words"):
        error_rates(["a"], ["..."])
