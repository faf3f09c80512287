import math

import pandas as pd
import pytest

from distillery import baselines, tasks
from distillery.data.examples import EXAMPLE_SCHEMA


def _write_rec(tmp_path, histories, targets):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "examples" / "recommendation" / "test").mkdir(parents=True)
    pd.DataFrame({"item_id": ["a", "b", "c", "d"]}).to_parquet(tmp_path / "items.parquet")  # vocab ids 2..5
    n = len(targets)
    table = pa.table({"task": ["recommendation"] * n, "split": ["test"] * n, "example_id": [str(i) for i in range(n)],
                      "user_id": [f"u{i}" for i in range(n)], "history": histories, "item": targets,
                      "label": [1] * n, "slot": [None] * n, "impression_id": [None] * n}, schema=EXAMPLE_SCHEMA)
    pq.write_table(table, tmp_path / "examples" / "recommendation" / "test" / "part.parquet")


def test_popularity_ranking_hand_computed(tmp_path):
    # counts from the histories: item 2 twice, item 3 once.
    # user 0: target 4, history {2, 3} masked, 4 and 5 tie at 0 -> pessimistic rank 2
    # user 1: target 3, history {2} masked, 3 has the top count -> rank 1
    _write_rec(tmp_path, [[2, 3], [2]], [4, 3])
    m = baselines.popularity_ranking(str(tmp_path), "recommendation", "test")
    assert m["hr@10"] == 1.0
    assert m["ndcg@10"] == pytest.approx((1 / math.log2(3) + 1) / 2)
    assert m["mrr"] == pytest.approx((0.5 + 1) / 2)
    assert "hr@10_sampled100" not in m  # a 4-item catalogue cannot give 100 negatives


def test_baselines_on_a_prepared_run(prepared):
    cfg, run_dir, manifest = prepared
    out = tasks.baselines(str(run_dir / "prepare"), ("recommendation", "ctr", "intent"))
    rec = out["recommendation"]["popularity"]
    assert set(rec) == {"hr@10", "ndcg@10", "mrr"}  # 80 items: too few for the sampled-100 protocol
    assert rec["hr@10"] > 10 / manifest["counts"]["items"]  # better than a random ranking
    ctr = out["ctr"]["popularity"]
    assert set(ctr) == {"auc", "gauc", "logloss"} and 0 <= ctr["auc"] <= 1 and ctr["logloss"] > 0
    intent = out["intent"]["tfidf_logreg"]
    test = pd.read_parquet(run_dir / "prepare" / "examples" / "intent" / "test")
    assert intent["accuracy"] > test["label"].value_counts(normalize=True).iloc[0]  # beats the majority class
