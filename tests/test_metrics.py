"""Metrics against hand-computed cases and reference implementations, including ties and single-class users."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import f1_score, log_loss, roc_auc_score

from distillery import metrics as M
from distillery.tasks import SCORE_METRIC


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
    with pytest.raises(ValueError, match="example 0: 45 catalogue items are outside"):
        M.sample_negatives(targets, hist, vocab_size=50)


def test_sampled_protocol_is_left_out_when_a_history_leaves_under_100_items():
    # 120 items, one user has seen 30 of them: 89 are left to draw 100 negatives from
    targets, hist = np.array([40, 50]), [np.arange(2, 32), np.array([3])]
    with pytest.raises(ValueError, match="example 0: 89 catalogue items"):
        M.sample_negatives(targets, hist, vocab_size=122)
    scores = np.random.default_rng(0).random((2, 122))
    full, sampled = M.ranking_ranks(lambda a, b: scores[a:b], targets, hist, vocab_size=122)
    assert sampled is None and len(full) == 2
    assert M.ranking_ranks(lambda a, b: scores[a:b], targets, [np.arange(2, 21), np.array([3])], vocab_size=122)[1] is not None


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


def test_classification_metrics_match_reference():
    y = np.array([0, 1, 2, 2, 1, 0, 3])
    p = np.array([0, 2, 2, 2, 1, 1, 4])  # class 4 only predicted, class 3 only true
    m = M.classification_metrics(y, p)
    assert m["accuracy"] == pytest.approx(4 / 7)
    assert m["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 5)), min_size=2, max_size=60))
def test_auc_matches_reference_on_heavily_tied_scores(pairs):
    y, s = (np.array(v) for v in zip(*pairs))
    if len(set(y.tolist())) < 2:
        assert math.isnan(M.auc(y, s))
    else:
        assert M.auc(y, s) == pytest.approx(roc_auc_score(y, s))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 5)), min_size=1, max_size=40),
       st.lists(st.integers(0, 10**6), min_size=1, max_size=80))
def test_auc_of_rows_equals_auc_of_the_rows_it_is_given(pairs, picks):
    y, s = (np.array(v) for v in zip(*pairs))
    rows = np.array(picks) % len(y)  # repeated rows, as a bootstrap draws them
    got, want = M.auc_of_rows(y, s)(rows), M.auc(y[rows], s[rows])
    assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want)


def _ndcg(ranks):
    return lambda rows: M.ranking_metrics(ranks[rows])["ndcg@10"]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 30), min_size=3, max_size=80), st.integers(0, 2**16))
def test_paired_interval_of_a_model_against_itself_or_a_constant_multiple(ranks, seed):
    ranks = np.array(ranks)
    units = np.arange(len(ranks))
    same = M.paired_ratio_interval(_ndcg(ranks), _ndcg(ranks), units, resamples=50, seed=seed)
    if ranks.min() <= 10:  # paired: the shared examples cancel, so the interval has no width
        assert same["ratio"] == same["low"] == same["high"] == pytest.approx(1.0)
        double = M.paired_ratio_interval(lambda r: 2 * _ndcg(ranks)(r), _ndcg(ranks), units, resamples=50, seed=seed)
        assert double["ratio"] == pytest.approx(2.0) and double["low"] == pytest.approx(2.0)
    else:  # every resample's denominator is 0: no ratio, and no interval
        assert math.isnan(same["ratio"]) and same["resamples"] == 0 and math.isnan(same["low"])


def test_paired_interval_draws_whole_units_and_covers_the_sampling_noise():
    rng = np.random.default_rng(0)
    units = np.repeat(np.arange(200), 2)  # two rows per user, drawn together
    seen = []

    def numerator(rows):
        seen.append(rows)
        return float(len(rows))

    M.paired_ratio_interval(numerator, lambda rows: float(len(rows)), units, resamples=20, seed=1)
    for rows in seen:
        counts = np.bincount(rows, minlength=len(units))
        assert np.array_equal(counts[0::2], counts[1::2])
    # a model that is right on 90% of examples against one right on all: the interval holds the
    # truth and is about as wide as binomial noise on 2,000 examples says (+- 1.96 * 0.0067)
    hits = (rng.random(2000) < 0.9).astype(float)
    r = M.paired_ratio_interval(lambda rows: hits[rows].mean(), lambda rows: 1.0, np.arange(2000), seed=0)
    assert r["low"] < 0.9 < r["high"] and 0.02 < r["high"] - r["low"] < 0.033
    assert r["resamples"] == 1000 and r["units"] == 2000 and r["ratio"] == pytest.approx(hits.mean())
    with pytest.raises(ValueError, match="level"):
        M.paired_ratio_interval(numerator, numerator, units, level=1.0)


def test_ratio_intervals_of_two_models_outputs_match_their_metrics():
    from distillery import evaluation

    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(50), 5)

    def outputs(noise):
        label = np.tile([1, 0, 0, 0, 0], 50)
        y = rng.integers(0, 4, 80)
        return {"recommendation": {"rank": rng.integers(1, 15, 120), "unit": np.arange(120)},
                "ctr": {"label": label, "prob": label * 0.3 + noise * rng.random(250), "unit": users},
                "intent": {"label": y, "prediction": np.where(rng.random(80) < noise, rng.integers(0, 4, 80), y),
                           "unit": np.arange(80)}}

    student, teacher = outputs(0.9), outputs(0.5)
    got = evaluation.ratio_intervals(student, teacher, resamples=200)
    ms, mt = evaluation.metrics_of(student), evaluation.metrics_of(teacher)
    assert set(got) == {"recommendation", "ctr", "intent"}  # the tasks both outputs hold
    for t, m in ((t, SCORE_METRIC[t]) for t in got):
        assert got[t]["metric"] == m and got[t]["ratio"] == pytest.approx(ms[t][m] / mt[t][m])
        assert got[t]["low"] < got[t]["ratio"] < got[t]["high"]
    assert got["ctr"]["units"] == 50 and got["intent"]["units"] == 80
    teacher["intent"] = {k: v[:40] for k, v in teacher["intent"].items()}
    with pytest.raises(ValueError, match="intent: the two models' outputs are not of the same examples"):
        evaluation.ratio_intervals(student, teacher)
