"""Ragged shops end to end (hypothesis): every optional input column absent, all null, or null in a
random subset of rows, plus the shapes real logs have (an intent class with one text, users with
one or two clicks, items nobody clicked, a catalogue with one category).

`prepare` runs on many such shops in `make test`; the whole pipeline (tiny models, one epoch) and
the served bundle run on a few in `make test-slow`. Each run either succeeds with every count
adding up, or stops with a `DistilleryError` that names the column and what to do. Any other
exception fails the test: no traceback from inside the library reaches a user.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

ITEM_OPTIONAL = ("title", "category", "brand", "description", "price")
INTERACTION_OPTIONAL = ("query", "impression_id", "slot", "clicked")
MODES = ("present", "absent", "all_null", "some_null")
EDGES = ("one_category", "singleton_class", "short_users", "unclicked_items")
RAGGED = settings(suppress_health_check=list(HealthCheck), deadline=None, derandomize=True, database=None)


@dataclasses.dataclass(frozen=True)
class Shop:
    items: dict          # column -> mode
    interactions: dict   # column -> mode
    reviews: str         # present | absent | some_null (titles)
    edges: frozenset
    seed: int


SHOPS = st.builds(
    Shop,
    items=st.fixed_dictionaries({c: st.sampled_from(MODES) for c in ITEM_OPTIONAL}),
    interactions=st.fixed_dictionaries({c: st.sampled_from(MODES) for c in INTERACTION_OPTIONAL}),
    reviews=st.sampled_from(("present", "absent", "some_null")),
    edges=st.frozensets(st.sampled_from(EDGES)),
    seed=st.integers(0, 2 ** 16),
)
# the report: a real catalogue where some items have no category
SOME_CATEGORIES_MISSING = Shop(items={**dict.fromkeys(ITEM_OPTIONAL, "present"), "category": "some_null"},
                               interactions=dict.fromkeys(INTERACTION_OPTIONAL, "present"), reviews="present",
                               edges=frozenset(), seed=1)
ONE_CATEGORY = dataclasses.replace(SOME_CATEGORIES_MISSING, edges=frozenset({"one_category"}))
EVERYTHING_RAGGED = Shop(items=dict.fromkeys(ITEM_OPTIONAL, "some_null"),
                         interactions=dict.fromkeys(INTERACTION_OPTIONAL, "some_null"), reviews="some_null",
                         edges=frozenset({"singleton_class", "short_users", "unclicked_items"}), seed=2)


@pytest.fixture(scope="module")
def base_shop() -> dict[str, pd.DataFrame]:
    from distillery.config import SyntheticConfig
    from distillery.data import synthetic

    tables = {k: t.to_pandas() for k, t in synthetic.generate(
        SyntheticConfig(users=60, items=60, sessions_per_user=6, seed=3)).items()}
    # the generator can show an item in two slots of one impression: without `slot` those rows would
    # be exact copies, rejected as duplicates (a clean refusal, but not the shape under test here)
    inter = tables["interactions"]
    tables["interactions"] = inter.drop_duplicates([c for c in inter.columns if c != "slot"]).reset_index(drop=True)
    return tables


def _blank(df: pd.DataFrame, column: str, mode: str, rng: np.random.Generator) -> pd.DataFrame:
    if mode == "absent":
        return df.drop(columns=[column])
    df[column] = df[column].astype(object)
    if mode == "all_null":
        df[column] = None
    elif mode == "some_null":
        df.loc[rng.random(len(df)) < 0.3, column] = None
    return df


def make_shop(shop: Shop, base: dict[str, pd.DataFrame], out: Path) -> dict[str, str]:
    """Write `shop` as native Parquet files under `out`; return {table: path}."""
    rng = np.random.default_rng(shop.seed)
    items, inter, reviews = (base[k].copy() for k in ("items", "interactions", "reviews"))
    if "one_category" in shop.edges:
        items["category"] = "Office > Pens > Gel"
    if "singleton_class" in shop.edges:  # a class with one text: merged into "other"
        items.loc[0, "category"] = "Garden > Hoses"
    if "unclicked_items" in shop.edges:
        extra = items.head(4).copy()
        extra["item_id"] = [f"never-{k}" for k in range(4)]
        items = pd.concat([items, extra], ignore_index=True)
    if "short_users" in shop.edges:  # one user with a single click, one with the minimum history (two)
        first = items["item_id"].iloc[:3].tolist()
        short = pd.DataFrame({"user_id": ["solo", "pair", "pair"], "item_id": first,
                              "timestamp": [1_700_000_000, 1_700_000_000, 1_700_000_100], "clicked": [1, 1, 1]})
        inter = pd.concat([inter, short], ignore_index=True)
    for column, mode in shop.items.items():
        items = _blank(items, column, mode, rng)
    for column, mode in shop.interactions.items():
        inter = _blank(inter, column, mode, rng)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"items": out / "items.parquet", "interactions": out / "interactions.parquet"}
    items.to_parquet(paths["items"], index=False)
    inter.to_parquet(paths["interactions"], index=False)
    if shop.reviews != "absent":
        if shop.reviews == "some_null":
            reviews = _blank(reviews, "title", "some_null", rng)
        paths["reviews"] = out / "reviews.parquet"
        reviews.to_parquet(paths["reviews"], index=False)
    return {k: str(v) for k, v in paths.items()}


def shop_config(paths: dict[str, str], run_dir: Path, *overrides: str):
    from distillery.config import load_config

    # review sentiment needs reviews: a shop without them runs the other tasks, as a user would
    return load_config(ROOT / "configs" / "demo.yaml", [
        f"run_dir={run_dir}", "data.format=native", *[f"data.{k}={v}" for k, v in paths.items()],
        "data.user_buckets=2", "tasks.intent.min_class_count=3",
        *(() if "reviews" in paths else ("tasks.sentiment.enabled=false",)), *overrides])


def missing(values) -> int:
    return sum(not (isinstance(v, str) and v.strip()) for v in values)


def check_prepare(manifest: dict, shop: Shop, paths: dict[str, str]) -> None:
    """The counts add up, against the files as written."""
    items = pd.read_parquet(paths["items"])
    n = len(items)
    assert manifest["counts"]["items"] + manifest["rejects_by_table"].get("items", 0) == n
    assert manifest["rejects_by_table"].get("items", 0) == 0  # a missing optional field is never a reject
    cov = manifest["coverage"]
    for column in ("title", "category", "brand", "description"):
        expect = n if column not in items.columns else missing(items[column])
        assert cov["items_without"][column] == expect, column
    price = items["price"] if "price" in items.columns else pd.Series([None] * n)
    assert cov["items_without"]["price"] == int(pd.to_numeric(price, errors="coerce").isna().sum())
    texts = [c for c in ("title", "brand", "description", "category") if c in items.columns]
    no_text = sum(all(not (isinstance(r[c], str) and r[c].strip()) for c in texts) for _, r in items.iterrows())
    assert cov["items_without"]["text"] == no_text
    if "unclicked_items" in shop.edges:
        assert cov["items_never_clicked"] >= 4
    if "short_users" in shop.edges:
        assert cov["users_without_examples"] >= 1 and cov["users_with_test_example_only"] >= 1
    if "intent" in manifest["examples"]:
        left = manifest["intent"]["left_out"]
        has_uncategorized = cov["items_without"]["category"] > 0
        assert left["outside_classes"] == 0  # not a warm start
        if not has_uncategorized:
            assert left["no_category"] == 0
        written = {s: len(pd.read_parquet(Path(paths["items"]).parents[1] / "run" / "prepare" / "examples" / "intent" / s))
                   for s in manifest["examples"]["intent"]}
        assert written == manifest["examples"]["intent"]  # the counts are the rows on disk
    if "sentiment" in manifest["examples"]:  # every review has a rating here: none is left out
        assert manifest["sentiment"]["left_out"] == {"no_rating_or_text": 0}
        assert sum(manifest["examples"]["sentiment"].values()) > 0


def expect_clean_error(err) -> None:
    """The refusals a shop of these shapes may get, each naming the file, the column and what to do:
    too few intent classes, or too many rejected rows."""
    msg = str(err)
    intent = ("column 'category' of" in msg or "column 'title' of" in msg) and "tasks.intent.enabled=false" in msg
    rejects = "data.max_reject_fraction" in msg and "in column" in msg and ".parquet" in msg
    assert intent or rejects, msg


def run_shop(shop: Shop, base: dict, tmp: Path, tried: dict, stages: list[str] | None, *overrides: str):
    """Write `shop`, run `stages` on it and count it in `tried`: the manifests, or None when the
    run was refused cleanly (any other exception fails the test)."""
    from distillery import runner
    from distillery.errors import DistilleryError

    tried["n"] += 1
    paths = make_shop(shop, base, tmp / "data")
    try:
        manifests = runner.run(shop_config(paths, tmp / "run", *overrides), stages)
    except DistilleryError as err:
        expect_clean_error(err)
        tried["refused"] += 1
        return None
    check_prepare(manifests["prepare"], shop, paths)
    return manifests


@pytest.mark.integration
@pytest.mark.fuzz
def test_prepare_handles_every_ragged_shop(base_shop, ray_local, tmp_path_factory, reliability):
    tried = {"n": 0, "ok": 0, "refused": 0}

    @settings(RAGGED, max_examples=5)
    @example(SOME_CATEGORIES_MISSING)
    @example(EVERYTHING_RAGGED)
    @example(ONE_CATEGORY)
    @given(SHOPS)
    def check(shop: Shop):
        if run_shop(shop, base_shop, tmp_path_factory.mktemp("ragged"), tried, ["prepare"]) is not None:
            tried["ok"] += 1

    check()
    reliability.update(pipeline_inputs=tried["n"], pipeline_inputs_handled=tried["ok"] + tried["refused"])
    assert tried["ok"] >= 2 and tried["refused"] >= 1  # the explicit examples: two run through, one is refused


def serve_every_endpoint(bundle_dir: str, items: pd.DataFrame) -> int:
    """Every endpoint of a bundle answers a valid request with 200; returns the requests sent."""
    from distillery.serving import api
    from distillery.serving.service import Service
    from fastapi.testclient import TestClient

    service = Service.from_bundle(bundle_dir)
    client = TestClient(api.create_app(api.LocalBackend(service), api_key=""))
    ids = items["item_id"].astype(str).tolist()
    requests = [
        ("get", "/healthz", None), ("get", "/v1/model", None), ("get", "/v1/items?limit=1000", None),
        ("post", "/v1/recommend", {"history": ids[:3], "k": 5, "explain": True}),
        ("post", "/v1/recommend", {"history": ["not-an-item"], "k": 5}),
        ("post", "/v1/ctr", {"history": ids[:2], "candidates": ids[-5:], "explain": True}),
        ("post", "/v1/ctr", {"history": [], "candidates": ids[:3]}),
        ("post", "/v1/intent", {"texts": ["gel pen", "zzzz qqq"], "explain": True}),
    ]
    for method, path, body in requests:
        r = client.get(path) if method == "get" else client.post(path, json=body)
        assert r.status_code == 200, (path, r.status_code, r.text[:300])
        if path.startswith("/v1/items"):
            listed = r.json()["items"]
            assert len(listed) == len(ids) and r.json()["total"] == len(ids)
            assert not any(x[k] in ("nan", "None") for x in listed for k in ("title", "category"))
        if path == "/v1/ctr":
            assert all(0 <= p["probability"] <= 1 for p in r.json()["predictions"])
        if path == "/v1/recommend":
            assert all(math.isfinite(x["score"]) for x in r.json()["items"])
    return len(requests)


TINY_PIPELINE = (
    "teacher.epochs=1", "teacher.sequence.dims=[16]", "teacher.sequence.epochs=1", "teacher.sequence.members=1",
    "teacher.sasrec.dims=[16]", "teacher.sasrec.dropouts=[0.2]", "label.top_k=8", "label.cpus_per_worker=1",
    "distill.epochs=1", "distill.steps_per_epoch=2", "distill.cpus_per_worker=1", "tune.num_samples=1",
    "tune.epochs=1", "tune.grace_period=1", "compress.unit_keep=[0.5]", "compress.finetune_steps=2", "compress.latency_requests=10",
    "report.latency_requests=10", "tasks.intent.transfer_variants=1",
)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.fuzz
def test_whole_pipeline_and_endpoints_on_ragged_shops(base_shop, ray_local, tiny_bert, tmp_path_factory, reliability):
    tried = {"n": 0, "ok": 0, "refused": 0, "requests": 0}

    @settings(RAGGED, max_examples=1)
    @example(SOME_CATEGORIES_MISSING)
    @given(SHOPS)
    def check(shop: Shop):
        tmp = tmp_path_factory.mktemp("ragged-run")
        manifests = run_shop(shop, base_shop, tmp, tried, None, f"teacher.model={tiny_bert}", *TINY_PIPELINE)
        if manifests is None:
            return
        assert all(m["status"] == "complete" for m in manifests.values()), {k: m["status"] for k, m in manifests.items()}
        tried["requests"] += serve_every_endpoint(str(tmp / "run" / "bundle"), pd.read_parquet(tmp / "data" / "items.parquet"))
        tried["ok"] += 1

    check()
    reliability.update(pipeline_inputs=tried["n"], pipeline_inputs_handled=tried["ok"] + tried["refused"])
    assert tried["ok"] >= 1  # the shop (some categories missing) runs through every stage
