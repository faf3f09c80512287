"""The recommendation and CTR examples, built together in one pass over each user's clicks.

recommendation  one example per next click: history = the user's earlier clicks (most recent
                `max_history`), target = the click. Leave-one-out: the last click is `test`, the
                second-to-last `valid`, the rest `train`.
ctr             real impressions when the log has non-clicks: one example per shown item, history =
                clicks strictly before it. Splits follow the same per-user cut points as
                recommendation (rows at/after the user's last click are `test`, at/after the
                second-to-last `valid`), so no task trains on another task's test period.
                Without impressions (implicit feedback), DIN-style: each recommendation example
                gives one positive and `negative_ratio` negatives drawn with probability
                ~ clicks**popularity_alpha from items the user never clicked, seeded per user.

Both share the user's click sequence and its cut points, so the prepare stage runs this once for
whichever of the two are enabled (`Task.per_user`).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
from ray.data.expressions import col

from ..data import examples as ex
from ..data.sources import group_by
from ..data.tables import count_rows, write_dir
from .base import PrepareInputs

RECOMMENDATION, CTR = "recommendation", "ctr"


class _Rows:
    """Column buffers for ex.EXAMPLE_SCHEMA; histories kept as flat values + offsets."""

    def __init__(self):
        self.cols = {k: [] for k in ("task", "split", "example_id", "user_id", "item", "label", "slot", "impression_id")}
        self.values: list[np.ndarray] = []
        self.offsets = [0]

    def add(self, task, split, example_id, user, history: np.ndarray, item, label, slot=None, impression=None):
        c = self.cols
        c["task"].append(task); c["split"].append(split); c["example_id"].append(example_id)
        c["user_id"].append(user); c["item"].append(int(item)); c["label"].append(int(label))
        c["slot"].append(slot); c["impression_id"].append(impression)
        self.values.append(history)
        self.offsets.append(self.offsets[-1] + len(history))

    def table(self) -> pa.Table:
        values = np.concatenate(self.values).astype(np.int32) if self.values else np.zeros(0, np.int32)
        history = pa.ListArray.from_arrays(pa.array(self.offsets, pa.int32()), pa.array(values, pa.int32()))
        arrays = {k: pa.array(v, type=ex.EXAMPLE_SCHEMA.field(k).type) for k, v in self.cols.items()}
        arrays["history"] = history
        return pa.table({f.name: arrays[f.name] for f in ex.EXAMPLE_SCHEMA}, schema=ex.EXAMPLE_SCHEMA)


def _loo_split(t: int, n: int) -> str:
    return "test" if t == n - 1 else "valid" if t == n - 2 else "train"


def user_examples(group: pd.DataFrame, *, item_ids: np.ndarray, tasks: tuple[str, ...], rec_history: int,
                  ctr_history: int, real_impressions: bool, negative_ratio: int, neg_cdf: np.ndarray,
                  seed: int) -> pa.Table:
    """Recommendation and CTR examples for every user in `group` (one user bucket)."""
    df = group.sort_values(["user_id", "_order", "impression_id", "slot", "item_id"], na_position="first",
                           kind="mergesort").reset_index(drop=True)
    users = df["user_id"].to_numpy(dtype=object)
    items = ex.lookup(item_ids, df["item_id"].to_numpy(dtype=object))
    order = df["_order"].to_numpy(dtype=float)
    clicked = df["clicked"].to_numpy(dtype=np.int64) == 1
    slots = pd.to_numeric(df["slot"], errors="coerce").to_numpy(dtype=float)
    # a missing impression id may arrive as None, NaN or pd.NA (pandas' string dtypes): all become null
    imps = np.array([v if isinstance(v, str) else None for v in df["impression_id"]], dtype=object)
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if len(df) else np.array([], int)
    ends = np.r_[starts[1:], len(df)]
    user_hash = pd.util.hash_array(users[starts]) if len(starts) else np.array([], np.uint64)
    out = _Rows()
    for u, (a, b) in enumerate(zip(starts, ends)):
        user = users[a]
        pos = np.flatnonzero(clicked[a:b]) + a
        seq, seq_order, n = items[pos], order[pos], len(pos)
        if RECOMMENDATION in tasks:
            for t in range(1, n):
                out.add(RECOMMENDATION, _loo_split(t, n), f"rec:{user}:{t}", user, seq[max(0, t - rec_history):t], seq[t], 1)
        if CTR not in tasks:
            continue
        if real_impressions:
            cut_test = seq_order[n - 1] if n >= 2 else np.inf
            cut_valid = seq_order[n - 2] if n >= 3 else np.inf
            before = np.searchsorted(seq_order, order[a:b], side="left")  # clicks strictly earlier
            for j in range(b - a):
                o, k = order[a + j], before[j]
                split = "test" if o >= cut_test else "valid" if o >= cut_valid else "train"
                slot = None if np.isnan(slots[a + j]) else int(slots[a + j])
                out.add(CTR, split, f"ctr:{user}:{j}", user, seq[max(0, k - ctr_history):k], items[a + j],
                        clicked[a + j], slot, imps[a + j])
        elif n >= 2:
            rng = np.random.default_rng([seed, int(user_hash[u])])
            seen = set(seq.tolist())
            for t in range(1, n):
                split, hist = _loo_split(t, n), seq[max(0, t - ctr_history):t]
                out.add(CTR, split, f"ctr:{user}:{t}:0", user, hist, seq[t], 1)
                for k, neg in enumerate(ex.sample_negatives(rng, neg_cdf, seen, negative_ratio), start=1):
                    out.add(CTR, split, f"ctr:{user}:{t}:{k}", user, hist, neg, 0)
    return out.table()


def build(inputs: PrepareInputs, tasks: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """The per-user tasks' examples in one pass over the user buckets -> {task: {split: rows}}."""
    cfg = inputs.cfg
    kwargs = dict(item_ids=inputs.item_ids, tasks=tasks, rec_history=cfg.tasks.recommendation.max_history,
                  ctr_history=cfg.tasks.ctr.max_history, real_impressions=inputs.real_impressions,
                  negative_ratio=cfg.tasks.ctr.negative_ratio,
                  neg_cdf=ex.negative_cdf(inputs.clicks.to_numpy(), cfg.tasks.ctr.popularity_alpha), seed=cfg.seed)
    built = (group_by(inputs.interactions, "_bucket", cfg.data.shuffle, num_partitions=cfg.data.user_buckets)
             .map_groups(lambda g: user_examples(g, **kwargs), batch_format="pandas").materialize())
    for task in tasks:
        for split in ex.SPLITS:
            part = built.filter(expr=(col("task") == task) & (col("split") == split))
            write_dir(part, inputs.out.examples(task, split), ex.EXAMPLE_SCHEMA)
    counts = {t: {s: 0 for s in ex.SPLITS} for t in tasks}
    for task, split, n in count_rows(built, ["task", "split"]).itertuples(index=False):
        counts[task][split] = int(n)
    return counts
