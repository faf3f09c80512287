"""Distillation losses against their formulas written out by hand, and their gradients."""
import math

import pytest
import torch

from distillery.losses import CtrKD, ClassificationKD, RecommendationKD, class_balance_weights


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_intent_loss_is_the_formula():
    s = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    t = torch.tensor([[1.0, 1.5, 0.0], [-1.0, 2.0, 0.5]])
    y = torch.tensor([0, 2])
    T, a = 3.0, 0.7
    want = 0.0
    for i in range(2):
        ce = -math.log(_softmax(s[i].tolist())[y[i]])
        p, q = _softmax((t[i] / T).tolist()), _softmax((s[i] / T).tolist())
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        want += ((1 - a) * ce + a * T * T * kl) / 2
    assert ClassificationKD(T, a)(s, t, y).item() == pytest.approx(want, rel=1e-5)


def test_ctr_loss_is_the_formula():
    s, t, y = torch.tensor([1.5, -0.5, 0.2]), torch.tensor([2.0, -3.0, 0.0]), torch.tensor([1.0, 0.0, 0.0])
    T, a = 2.0, 0.4
    want = 0.0
    for si, ti, yi in zip(s.tolist(), t.tolist(), y.tolist()):
        hard = -(yi * math.log(_sigmoid(si)) + (1 - yi) * math.log(1 - _sigmoid(si)))
        p, q = _sigmoid(ti / T), _sigmoid(si / T)
        soft = -(p * math.log(q) + (1 - p) * math.log(1 - q))
        want += ((1 - a) * hard + a * T * T * soft) / 3
    assert CtrKD(T, a)(s, t, y).item() == pytest.approx(want, rel=1e-5)


def test_recommendation_loss_is_softmax_ce_plus_kl_over_the_teachers_list():
    scores = torch.tensor([[0.1, 2.0, -1.0, 0.5, 1.0], [1.0, 0.0, 0.3, -0.2, 2.0]])
    target = torch.tensor([1, 4])
    top_ids = torch.tensor([[1, 4, 3], [4, 0, 2]])
    top_scores = torch.tensor([[5.0, 3.0, 1.0], [4.0, 2.5, 2.0]])
    T, a = 4.0, 0.5
    want = 0.0
    for i in range(2):
        ce = -math.log(_softmax(scores[i].tolist())[target[i]])
        p = _softmax((top_scores[i] / T).tolist())
        q = _softmax([scores[i, j].item() / T for j in top_ids[i].tolist()])
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        want += ((1 - a) * ce + a * T * T * kl) / 2
    assert RecommendationKD(T, a)(scores, target, top_ids, top_scores).item() == pytest.approx(want, rel=1e-5)


def test_intent_transfer_rows_add_only_the_soft_term():
    """Rows labelled -1 (transfer texts, no gold label) are left out of the CE mean, kept in the KL."""
    torch.manual_seed(0)
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    y = torch.tensor([2, -1, 0, -1])
    T, a = 2.0, 0.4
    gold = torch.tensor([True, False, True, False])
    ce = torch.nn.functional.cross_entropy(s[gold], y[gold]).item()
    want = 0.0
    for i in range(4):
        p, q = _softmax((t[i] / T).tolist()), _softmax((s[i] / T).tolist())
        want += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)) / 4
    assert ClassificationKD(T, a)(s, t, y).item() == pytest.approx((1 - a) * ce + a * T * T * want, rel=1e-5)
    only_transfer = ClassificationKD(T, a)(s[1::2], t[1::2], y[1::2])  # no gold row at all: the soft term alone
    assert torch.isfinite(only_transfer)


def test_class_weighted_intent_soft_term_is_the_formula():
    """KL_i is weighted by class_weight[argmax teacher_i]; transfer rows (-1) carry weights too."""
    torch.manual_seed(1)
    s, t = torch.randn(5, 3), torch.randn(5, 3)
    y = torch.tensor([0, -1, 2, 1, -1])
    w = torch.tensor([0.5, 2.0, 1.25])
    T, a = 1.5, 0.6
    gold = y >= 0
    ce = torch.nn.functional.cross_entropy(s[gold], y[gold]).item()
    soft = 0.0
    for i in range(5):
        p, q = _softmax((t[i] / T).tolist()), _softmax((s[i] / T).tolist())
        soft += w[int(t[i].argmax())].item() * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)) / 5
    got = ClassificationKD(T, a, class_weight=w)(s, t, y).item()
    assert got == pytest.approx((1 - a) * ce + a * T * T * soft, rel=1e-5)
    assert len(set(t.argmax(1).tolist())) == 3 and got != pytest.approx(ClassificationKD(T, a)(s, t, y).item(), rel=1e-3)
    # all-ones weights are the unweighted loss
    assert ClassificationKD(T, a, class_weight=torch.ones(3))(s, t, y).item() == pytest.approx(ClassificationKD(T, a)(s, t, y).item(),
                                                                                        rel=1e-6)


def test_class_balance_weights_are_the_formula():
    counts = torch.tensor([90, 9, 0, 1])
    w = class_balance_weights(counts, 0.5)
    raw = [(n + 1) ** -0.5 for n in (90, 9, 0, 1)]
    scale = 100 / sum(n * r for n, r in zip((90, 9, 0, 1), raw))
    assert w.tolist() == pytest.approx([r * scale for r in raw], rel=1e-6)
    assert float((counts * w).sum()) == pytest.approx(100.0, rel=1e-6)  # mean weight over the rows is 1
    assert w[1] > w[0] and w[3] > w[1]  # rarer classes weigh more
    assert class_balance_weights(counts, 0.0) is None
    flat = class_balance_weights(counts, 1.0)  # every class the same total weight, up to the +1
    assert (flat[0] * 90) / (flat[1] * 9) == pytest.approx((91 ** -1 * 90) / (10 ** -1 * 9), rel=1e-6)
    with pytest.raises(ValueError, match="power"):
        class_balance_weights(counts, -0.5)


def test_ranking_distillation_term_is_the_formula():
    """b * mean_rows[ sum_r w_r -log sigmoid(s[top_r]) + mean_j -log sigmoid(-s[neg_j]) ],
    w_r = exp(-r/lambda) normalized over the first rank_k of the teacher's list."""
    scores = torch.tensor([[0.1, 2.0, -1.0, 0.5, 1.0], [1.0, 0.0, 0.3, -0.2, 2.0]])
    target, top_ids = torch.tensor([1, 4]), torch.tensor([[1, 4, 3], [4, 0, 2]])
    top_scores = torch.tensor([[5.0, 3.0, 1.0], [4.0, 2.5, 2.0]])
    negatives = torch.tensor([[2, 3], [3, 1]])
    T, a, b, lam = 2.0, 0.5, 0.7, 1.5
    base = RecommendationKD(T, a)(scores, target, top_ids, top_scores).item()
    w = [math.exp(-r / lam) for r in range(2)]
    w = [x / sum(w) for x in w]
    rd = 0.0
    for i in range(2):
        pos = sum(w[r] * -math.log(_sigmoid(scores[i, top_ids[i, r]].item())) for r in range(2))
        neg = sum(-math.log(_sigmoid(-scores[i, j].item())) for j in negatives[i].tolist()) / 2
        rd += (pos + neg) / 2
    got = RecommendationKD(T, a, rank_weight=b, rank_k=2, rank_lambda=lam)(scores, target, top_ids, top_scores, negatives)
    assert got.item() == pytest.approx(base + b * rd, rel=1e-5)
    # the no-KD baseline (alpha 0) never gets it
    assert RecommendationKD(T, 0.0, rank_weight=b)(scores, target, top_ids, top_scores, negatives).item() == \
        pytest.approx(torch.nn.functional.cross_entropy(scores, target).item())


def test_alpha_zero_is_the_hard_loss_alone_and_alpha_one_the_soft_loss_alone():
    s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    assert ClassificationKD(5.0, 0.0)(s, t, y).item() == pytest.approx(torch.nn.functional.cross_entropy(s, y).item())
    assert ClassificationKD(1.0, 1.0)(s, s, y).item() == pytest.approx(0.0, abs=1e-6)  # same logits: no KL


def test_t_squared_keeps_the_soft_gradient_on_scale():
    """For large T the KL gradient shrinks as 1/T^2; times T^2 it tends to a constant
    ((s - t) / C per logit, the logit-matching limit), so the soft term stays comparable."""
    torch.manual_seed(0)
    s0, t = torch.randn(8, 6), torch.randn(8, 6)
    y = torch.zeros(8, dtype=torch.long)
    norms = []
    for T in (10.0, 100.0):
        s = s0.clone().requires_grad_(True)
        ClassificationKD(T, 1.0)(s, t, y).backward()
        norms.append(s.grad.norm().item())
    s = s0.clone().requires_grad_(True)
    limit = ((s0 - s0.mean(1, keepdim=True)) - (t - t.mean(1, keepdim=True))) / 6 / 8  # batchmean over 8
    assert norms[1] == pytest.approx(limit.norm().item(), rel=1e-2)
    assert norms[0] == pytest.approx(norms[1], rel=0.1)


@pytest.mark.parametrize("loss", ["intent", "intent_balanced", "ctr", "recommendation", "ranking"])
def test_gradients_match_finite_differences(loss):
    torch.manual_seed(0)
    dt = torch.float64
    if loss == "intent":
        t, y = torch.randn(3, 4, dtype=dt), torch.tensor([0, 3, 1])
        fn = lambda s: ClassificationKD(2.5, 0.6)(s, t, y)  # noqa: E731
        s = torch.randn(3, 4, dtype=dt, requires_grad=True)
    elif loss == "intent_balanced":
        t, y = torch.randn(4, 4, dtype=dt), torch.tensor([0, -1, 1, -1])
        fn = lambda s: ClassificationKD(2.5, 0.6, class_weight=torch.tensor([0.3, 1.7, 1.0, 2.2]))(s, t, y)  # noqa: E731
        s = torch.randn(4, 4, dtype=dt, requires_grad=True)
    elif loss == "ctr":
        t, y = torch.randn(5, dtype=dt), torch.tensor([1.0, 0, 0, 1, 0], dtype=dt)
        fn = lambda s: CtrKD(3.0, 0.3)(s, t, y)  # noqa: E731
        s = torch.randn(5, dtype=dt, requires_grad=True)
    elif loss == "recommendation":
        ids, sc, tgt = torch.tensor([[1, 2], [0, 3]]), torch.randn(2, 2, dtype=dt), torch.tensor([2, 0])
        fn = lambda s: RecommendationKD(2.0, 0.5)(s, tgt, ids, sc)  # noqa: E731
        s = torch.randn(2, 5, dtype=dt, requires_grad=True)
    else:
        ids, sc, tgt = torch.tensor([[1, 2], [0, 3]]), torch.randn(2, 2, dtype=dt), torch.tensor([2, 0])
        negs = torch.tensor([[3, 4], [1, 2]])
        fn = lambda s: RecommendationKD(2.0, 0.5, rank_weight=0.8, rank_k=2)(s, tgt, ids, sc, negs)  # noqa: E731
        s = torch.randn(2, 5, dtype=dt, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (s,))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="temperature"):
        ClassificationKD(0.0, 0.5)
    with pytest.raises(ValueError, match="alpha"):
        CtrKD(2.0, 1.5)
    with pytest.raises(ValueError, match="rank_weight"):
        RecommendationKD(2.0, 0.5, rank_weight=-1.0)
    with pytest.raises(ValueError, match="class_weight"):
        ClassificationKD(2.0, 0.5, class_weight=torch.tensor([1.0, -0.5]))
