"""Metrics against hand-computed cases and reference implementations, including ties and single-class users."""
import math

import numpy as np
import pytest
from sklearn.metrics import f1_score, log_loss, roc_auc_score

from distillery import metrics as M


def test_full_ranking_masks_history_and_reserved_ids():
    # vocab: 0 pad, 1 unk, items 2..6
    scores = np.array([[9.0, 9.0, 0.1, 0.9, 0.5, 0.7, 0.3]])
    # target 4 (0.5); items above it: 3 (0.9, in history -> masked), 5 (0.7) -> rank 2
    assert M.ranks_full(scores, np.array([4]), [np.array([3])]).tolist() == [2]
    # a repeat purchase: the target is in the history but stays rankable
    assert M.ranks_full(scores, np.array([3]), [np.array([3, 5])]).tolist() == [1]


def test_ties_count_against_the_target():
    scores = np.zeros((1, 12))
    assert M.ranks_full(scores, np.array([2]), [np.array([], int)]).tolist() == [10]  # all 9 others tie above
    m = M.ranking_metrics(np.array([10]), k=10)
    assert m["hr@10"] == 1.0 and m["ndcg@10"] == pytest.approx(1 / math.log2(11))
    assert M.ranking_metrics(np.array([11]), k=10)["hr@10"] == 0.0


def test_ranking_metrics_hand_computed():
    m = M.ranking_metrics(np.array([1, 3, 20]), k=10)
    assert m["hr@10"] == pytest.approx(2 / 3)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4)) / 3)
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 20) / 3)


def test_sampled_protocol():
    rng = np.random.default_rng(0)
    targets = np.array([5, 9])
    hist = [np.array([2, 3]), np.array([])]
    negs = M.sample_negatives(targets, hist, vocab_size=300, n=100, seed=1)
    assert negs.shape == (2, 100)
    assert (negs >= 2).all() and 5 not in negs[0] and 2 not in negs[0] and 3 not in negs[0]
    assert all(len(set(row)) == 100 for row in negs.tolist())
    assert np.array_equal(negs, M.sample_negatives(targets, hist, vocab_size=300, n=100, seed=1))
    scores = rng.random((2, 300))
    scores[0, 5] = 2.0  # best: rank 1
    scores[1, 9] = -1.0  # worst: rank 101
    m = M.recommendation_metrics(scores, targets, hist, negatives=negs)
    assert m["hr@10_sampled100"] == 0.5 and m["ndcg@10_sampled100"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="more than 100 items"):
        M.sample_negatives(targets, hist, vocab_size=50)


def test_auc_matches_reference_with_ties():
    y = np.array([0, 0, 1, 1, 0, 1, 0])
    s = np.array([0.1, 0.4, 0.4, 0.8, 0.8, 0.3, 0.1])
    assert M.auc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert M.auc(np.array([1, 0]), np.array([0.5, 0.5])) == 0.5
    assert math.isnan(M.auc(np.array([1, 1]), np.array([0.2, 0.3])))


def test_gauc_skips_single_class_users_and_weights_by_size():
    y = np.array([1, 0, 0, 1, 0, 1, 1])
    s = np.array([0.9, 0.1, 0.8, 0.2, 0.5, 0.7, 0.6])
    u = np.array(["a", "a", "b", "b", "b", "c", "c"])  # c has one class only
    expected = (1.0 * 2 + 0.0 * 3) / 5
    assert M.gauc(y, s, u) == pytest.approx(expected)
    assert math.isnan(M.gauc(np.array([1, 1]), np.array([0.1, 0.2]), np.array(["x", "x"])))


def test_logloss_matches_reference_and_clips():
    y = np.array([1, 0, 1, 0])
    p = np.array([0.9, 0.2, 0.6, 0.4])
    assert M.logloss(y, p) == pytest.approx(log_loss(y, p))
    assert math.isfinite(M.logloss(np.array([1]), np.array([0.0])))


def test_intent_metrics_match_reference():
    y = np.array([0, 1, 2, 2, 1, 0, 3])
    p = np.array([0, 2, 2, 2, 1, 1, 4])  # class 4 only predicted, class 3 only true
    m = M.intent_metrics(y, p)
    assert m["accuracy"] == pytest.approx(4 / 7)
    assert m["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))
