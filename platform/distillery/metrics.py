"""Task metrics, shared by the teacher, student, baselines and report.

Names are a contract: `hr@10`, `ndcg@10`, `mrr` (recommendation, full catalogue),
`hr@10_sampled100`, `ndcg@10_sampled100` (100 sampled negatives, the SASRec paper's protocol),
`auc`, `gauc`, `logloss` (ctr), `accuracy`, `macro_f1` (classes: intent).
Which metric ranks a task's models is the task's own (`tasks/`).

Conventions:
- Ranking ties count against the target (pessimistic): an item scored equal to the target ranks
  above it. A constant scorer therefore gets the worst rank, never a lucky one.
- Items the user already has in the history are masked, except the target itself (a repeat
  purchase stays rankable). Index 0 (padding) and 1 (unknown) are never candidates.
- AUC counts ties as half (Mann-Whitney). GAUC is the per-user AUC averaged with weights = the
  user's number of examples (DIN's definition), over users who have both classes.
"""
from __future__ import annotations

import math

import numpy as np

RESERVED = 2  # vocabulary ids 0 (pad) and 1 (unknown)


def ranks_full(scores: np.ndarray, targets: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
    """1-based rank of each target among all catalogue items.

    scores: [B, V] over the vocabulary (ids < 2 ignored); targets: [B] vocabulary ids;
    histories: B arrays of vocabulary ids to mask (the target itself is never masked).
    """
    scores = np.array(scores, dtype=np.float64, copy=True)
    b = np.arange(len(targets))
    target_score = scores[b, targets].copy()
    scores[:, :RESERVED] = -np.inf
    for i, hist in enumerate(histories):
        if len(hist):
            scores[i, np.asarray(hist, dtype=np.int64)] = -np.inf
    scores[b, targets] = -np.inf  # compare the target against the other candidates only
    above = (scores >= target_score[:, None]).sum(axis=1)
    return above + 1


def ranking_metrics(ranks: np.ndarray, k: int = 10, suffix: str = "") -> dict[str, float]:
    ranks = np.asarray(ranks, dtype=np.float64)
    if len(ranks) == 0:
        return {f"hr@{k}{suffix}": math.nan, f"ndcg@{k}{suffix}": math.nan, **({} if suffix else {"mrr": math.nan})}
    hit = ranks <= k
    out = {f"hr@{k}{suffix}": float(hit.mean()),
           f"ndcg@{k}{suffix}": float(np.where(hit, 1.0 / np.log2(ranks + 1.0), 0.0).mean())}
    if not suffix:
        out["mrr"] = float((1.0 / ranks).mean())
    return out


def _outside(target: int, history, vocab_size: int) -> int:
    """How many catalogue items (ids 2..vocab_size-1) are neither the target nor in the history."""
    seen = {int(target), *np.asarray(history).tolist()}
    return vocab_size - RESERVED - sum(RESERVED <= i < vocab_size for i in seen)


def sample_negatives(targets: np.ndarray, histories: list[np.ndarray], vocab_size: int, n: int = 100,
                     seed: int = 0) -> np.ndarray:
    """[B, n] item ids drawn uniformly from the catalogue, none in the history or the target.

    Deterministic for a seed, so every model is ranked against the same candidates.
    """
    rng = np.random.default_rng(seed)
    out = np.empty((len(targets), n), dtype=np.int64)
    n_items = vocab_size - RESERVED
    for i, (t, hist) in enumerate(zip(targets, histories)):
        banned = set(np.asarray(hist).tolist()) | {int(t)}
        if (left := _outside(t, hist, vocab_size)) < n:
            raise ValueError(f"example {i}: {left} catalogue items are outside its history and target, "
                             f"too few for {n} sampled negatives")
        picked: list[int] = []
        while len(picked) < n:
            for d in (rng.integers(0, n_items, 2 * n) + RESERVED).tolist():
                if d not in banned:
                    banned.add(d)
                    picked.append(d)
                    if len(picked) == n:
                        break
        out[i] = picked
    return out


def ranks_sampled(scores: np.ndarray, targets: np.ndarray, negatives: np.ndarray) -> np.ndarray:
    """1-based rank of the target among itself and its sampled negatives (ties pessimistic)."""
    b = np.arange(len(targets))[:, None]
    target_score = np.asarray(scores)[b[:, 0], targets]
    neg_scores = np.asarray(scores)[b, negatives]
    return (neg_scores >= target_score[:, None]).sum(axis=1) + 1


def ranking_ranks(score_batch, targets: np.ndarray, histories: list[np.ndarray], vocab_size: int,
                  seed: int = 0, batch: int = 1024) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-example 1-based ranks: (among the whole catalogue [N], among 100 sampled negatives [N] or
    None when some example has under 100 catalogue items outside its history and target, as in a
    small catalogue).

    score_batch(start, end) -> [end - start, vocab_size] scores for those examples; ranking in
    batches keeps memory at [batch, V] instead of [N, V].
    """
    sampled_ok = all(_outside(t, h, vocab_size) >= 100 for t, h in zip(targets, histories))
    negatives = sample_negatives(targets, histories, vocab_size, seed=seed) if sampled_ok else None
    full, sampled = [], []
    for a in range(0, len(targets), batch):
        b = min(a + batch, len(targets))
        scores = np.asarray(score_batch(a, b))
        full.append(ranks_full(scores, targets[a:b], histories[a:b]))
        if negatives is not None:
            sampled.append(ranks_sampled(scores, targets[a:b], negatives[a:b]))
    full = np.concatenate(full) if full else np.zeros(0, np.int64)
    return full, None if negatives is None else (np.concatenate(sampled) if sampled else np.zeros(0, np.int64))


def ranking_metrics_of(full: np.ndarray, sampled: np.ndarray | None, k: int = 10) -> dict[str, float]:
    """`ranking_ranks`'s two rank arrays -> the full-catalogue metrics, plus the sampled-100 ones."""
    out = ranking_metrics(full, k)
    if sampled is not None:
        out.update(ranking_metrics(sampled, k, suffix="_sampled100"))
    return out


def evaluate_ranking(score_batch, targets: np.ndarray, histories: list[np.ndarray], vocab_size: int,
                     seed: int = 0, batch: int = 1024, k: int = 10) -> dict[str, float]:
    """Full-catalogue metrics, plus sampled-100 ones when every example has at least 100 items to sample
    (`ranking_ranks`, then `ranking_metrics_of`)."""
    return ranking_metrics_of(*ranking_ranks(score_batch, targets, histories, vocab_size, seed, batch), k)


def recommendation_metrics(scores: np.ndarray, targets: np.ndarray, histories: list[np.ndarray],
                           negatives: np.ndarray | None = None, k: int = 10) -> dict[str, float]:
    """Full-catalogue metrics, plus the sampled-100 ones when `negatives` is given."""
    out = ranking_metrics(ranks_full(scores, targets, histories), k)
    if negatives is not None:
        out.update(ranking_metrics(ranks_sampled(scores, targets, negatives), k, suffix="_sampled100"))
    return out


# ------------------------------------------------------------------------------ ctr
def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their average rank: a value's tie group spans the sorted
    positions [left, right), whose 1-based ranks average to (left + right + 1) / 2."""
    sx = np.sort(x, kind="mergesort")
    return (np.searchsorted(sx, x, "left") + np.searchsorted(sx, x, "right") + 1) / 2.0


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve; NaN when only one class is present."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    r = _average_ranks(scores)
    return float((r[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auc_of_rows(labels: np.ndarray, scores: np.ndarray):
    """-> f(rows [M], indices into labels/scores, may repeat) = auc(labels[rows], scores[rows]),
    from one sort of the scores: each call counts rows per score value and class, O(N + M), where
    `auc` would sort again. A bootstrap scores a thousand resamples of one model's rows."""
    labels = np.asarray(labels).astype(bool)
    _, group = np.unique(np.asarray(scores, dtype=np.float64), return_inverse=True)
    n_groups = int(group.max()) + 1 if len(group) else 0

    def of(rows: np.ndarray) -> float:
        g, y = group[rows], labels[rows]
        pos, neg = np.bincount(g[y], minlength=n_groups), np.bincount(g[~y], minlength=n_groups)
        n_pos, n_neg = int(pos.sum()), int(neg.sum())
        if n_pos == 0 or n_neg == 0:
            return math.nan
        below = np.cumsum(neg) - neg  # negatives scored strictly below each score value
        return float((pos * (below + neg / 2.0)).sum() / (n_pos * n_neg))
    return of


def gauc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> float:
    labels, scores, groups = np.asarray(labels), np.asarray(scores, dtype=np.float64), np.asarray(groups)
    order = np.argsort(groups, kind="mergesort")
    g = groups[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]]) if len(g) else np.array([], int)
    ends = np.r_[starts[1:], len(g)]
    total, weight = 0.0, 0
    for a, b in zip(starts, ends):
        idx = order[a:b]
        value = auc(labels[idx], scores[idx])
        if not math.isnan(value):
            total += value * len(idx)
            weight += len(idx)
    return total / weight if weight else math.nan


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    y = np.asarray(labels, dtype=np.float64)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()) if len(y) else math.nan


def ctr_metrics(labels: np.ndarray, probs: np.ndarray, users: np.ndarray) -> dict[str, float]:
    """`probs` are click probabilities (AUC and GAUC only need their order)."""
    return {"auc": auc(labels, probs), "gauc": gauc(labels, probs, users), "logloss": logloss(labels, probs)}


# ------------------------------------------------------------------------------ classes
def classification_metrics(labels: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 over the classes present in labels or predictions."""
    y, p = np.asarray(labels), np.asarray(predictions)
    if len(y) == 0:
        return {"accuracy": math.nan, "macro_f1": math.nan}
    f1s = []
    for c in np.union1d(y, p):
        tp = float(((p == c) & (y == c)).sum())
        denom = float((p == c).sum() + (y == c).sum())
        f1s.append(2 * tp / denom if denom else 0.0)
    return {"accuracy": float((y == p).mean()), "macro_f1": float(np.mean(f1s))}


# ------------------------------------------------------------------------------ intervals
def paired_ratio_interval(numerator, denominator, units: np.ndarray, *, resamples: int = 1000,
                          level: float = 0.95, seed: int = 0) -> dict[str, float]:
    """The ratio numerator(rows) / denominator(rows) over all rows, with a paired percentile
    bootstrap interval: each resample draws units with replacement and takes all their rows, the
    same rows for both sides, so what the two models share (the test examples' difficulty) cancels.

    numerator, denominator: f(row indices [M]) -> a metric of those rows (e.g. a student's and its
    teacher's NDCG@10 over the same examples); units: [N] each row's resampling unit (one id per
    example, or the user for CTR rows, whose candidates are drawn together). Resamples where the
    denominator is 0 or either side NaN (an AUC with one class) are left out.
    -> {"ratio", "low", "high", "level", "resamples" (the ones kept), "units"}.
    """
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(f"need 0 < level < 1 and resamples >= 1 (got {level} and {resamples})")
    units = np.asarray(units)
    _, inverse = np.unique(units, return_inverse=True)
    order = np.argsort(inverse, kind="mergesort")  # each unit's rows, one run after another
    starts = np.r_[0, np.cumsum(np.bincount(inverse))]
    n_units = len(starts) - 1
    rows = np.arange(len(units))
    den = denominator(rows)
    ratio = numerator(rows) / den if den else math.nan
    rng = np.random.default_rng(seed)
    ratios = []
    for _ in range(resamples if n_units else 0):
        picked = rng.integers(0, n_units, n_units)
        if n_units == len(units):
            idx = order[picked]
        else:  # every row of each picked unit: its run of `order`, from starts[u] for lengths[u] rows
            lengths = starts[picked + 1] - starts[picked]
            first = np.repeat(starts[picked] - np.cumsum(lengths) + lengths, lengths)
            idx = order[first + np.arange(lengths.sum())]
        num, den = numerator(idx), denominator(idx)
        if den and not (math.isnan(num) or math.isnan(den)):
            ratios.append(num / den)
    tail = (1 - level) / 2 * 100
    low, high = (np.percentile(ratios, [tail, 100 - tail]).tolist() if ratios else [math.nan, math.nan])
    return {"ratio": float(ratio), "low": float(low), "high": float(high), "level": level,
            "resamples": len(ratios), "units": n_units}
