"""Property-based bad-input tests (hypothesis): validation, the readers and the HTTP API.

Rows: random types, nulls, huge strings, bytes that are not UTF-8, NaN/inf, negative and huge
timestamps, unknown columns. Every row must come out either clean (and typed) or rejected with a
reason; nothing may raise. Files: the same through the real Ray readers, with broken lines and
schemas that differ between files. Requests: bodies generated from the service's own OpenAPI
schema, valid-shaped or mutated, must never get a 5xx, and the server must keep answering.
Each test counts what it tried and handled in `reliability` (benchmarks/reliability.py).
"""
from __future__ import annotations

import json
import math
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import free_port
from distillery.data.validate import (
    INTERACTION_COLUMNS,
    ITEM_COLUMNS,
    MAX_TIMESTAMP,
    REVIEW_COLUMNS,
    mark_duplicates,
    to_arrow,
    validate_items,
    validate_rows,
)
from distillery.stages.prepare import _typed as prepare_typed
from distillery.tasks import TASKS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.fuzz
# derandomized, so CI runs the same inputs every time (a failure prints the input to add as an example)
FUZZ = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
                deadline=None, derandomize=True, database=None)
CATALOGUE = np.array(["a", "b", "c", "sku-1"], dtype=object)
REASONS = {"unparsable_row", "null_id", "unknown_item", "missing_order", "unparsable_timestamp",
           "timestamp_out_of_range", "unparsable_position", "unparsable_slot", "clicked_not_binary", "rating_not_numeric",
           "rating_out_of_range", "empty_text", "duplicate", "duplicate_id", "price_not_numeric", "price_out_of_range"}

huge_text = st.builds(lambda c, n: c * n, st.characters(), st.integers(1_000, 200_000))
NASTY = st.one_of(
    st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70), st.integers(-5, 5),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40), huge_text,
    st.binary(max_size=12),  # mostly not UTF-8
    st.lists(st.one_of(st.integers(), st.text(max_size=5)), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
    st.sampled_from(["", " ", "nan", "NaN", "inf", "-inf", "-1", "1e30", "2014-03-05", "2014-13-45", "99999999999999",
                     "1400000000", "1.5", "0", "1", "true", "\ud800", "a\x00b", "DROP TABLE items;--"]),
)
IDS = st.one_of(st.sampled_from(list(CATALOGUE)), NASTY)
TIMESTAMPS = st.one_of(st.integers(-(2 ** 63), 2 ** 63 - 1), st.integers(1_300_000_000, 1_500_000_000), NASTY)


def _row(fields: dict) -> st.SearchStrategy:
    """Rows with some contract columns left out and an unknown column or two added."""
    extras = st.dictionaries(st.sampled_from(["note", "extra", "_x", "user id"]), NASTY, max_size=2)
    return st.builds(lambda kept, extra: {**kept, **extra},
                     st.fixed_dictionaries({}, optional=fields), extras)


INTERACTION_ROW = _row({"user_id": IDS, "item_id": IDS, "timestamp": TIMESTAMPS, "position": NASTY, "clicked": NASTY,
                        "query": NASTY, "impression_id": NASTY, "slot": NASTY})
REVIEW_ROW = _row({"user_id": IDS, "item_id": IDS, "timestamp": TIMESTAMPS, "rating": NASTY, "title": NASTY,
                   "text": NASTY})
ITEM_ROW = _row({"item_id": IDS, "title": NASTY, "category": NASTY, "brand": NASTY, "description": NASTY,
                 "price": NASTY})


def _frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, dtype=object) if rows else pd.DataFrame()
    df["_source"] = "fuzz.jsonl"
    return df


def _typed(df: pd.DataFrame, spec: dict) -> pa.Table:
    """As the prepare stage writes a validated batch."""
    return prepare_typed(spec)(df)


def _check_rows(table: pa.Table, n: int, spec: dict) -> None:
    assert table.num_rows == n, f"{n - table.num_rows} rows lost"
    for row in table.to_pylist():
        if row["_reason"] is None:
            assert isinstance(row["user_id"], str) and row["user_id"]
            assert row["item_id"] in CATALOGUE
            if row.get("timestamp") is not None:
                assert 0 <= row["timestamp"] <= MAX_TIMESTAMP
            if "rating" in spec and row["rating"] is not None:
                assert 1.0 <= row["rating"] <= 5.0
        else:
            assert row["_reason"] in REASONS and row["_column"]
            json.loads(row["_row"])  # the original row is kept, as JSON, for the rejects file


@pytest.mark.parametrize("table", ["interactions", "reviews"])
def test_validation_keeps_or_rejects_every_random_row(table, reliability):
    spec = INTERACTION_COLUMNS if table == "interactions" else REVIEW_COLUMNS
    reliability.update(tried=0, handled=0, rows_lost=0)

    @settings(FUZZ, max_examples=120)
    @given(st.lists(INTERACTION_ROW if table == "interactions" else REVIEW_ROW, min_size=1, max_size=25))
    def check(rows):
        reliability["tried"] += len(rows)
        out = validate_rows(_frame(rows), table=table, catalogue=CATALOGUE, buckets=4)
        typed = _typed(mark_duplicates(out), spec)
        reliability["rows_lost"] += len(rows) - typed.num_rows
        _check_rows(typed, len(rows), spec)
        reliability["handled"] += len(rows)

    check()


def test_catalogue_validation_keeps_or_rejects_every_random_item(reliability):
    reliability.update(tried=0, handled=0, rows_lost=0)

    @settings(FUZZ, max_examples=120)
    @given(st.lists(ITEM_ROW, min_size=1, max_size=25))
    def check(rows):
        reliability["tried"] += len(rows)
        clean, rejects = validate_items(_frame(rows))
        reliability["rows_lost"] += len(rows) - len(clean) - len(rejects)
        assert len(clean) + len(rejects) == len(rows)
        typed = to_arrow(clean, ITEM_COLUMNS, [c for c in clean.columns if c not in ITEM_COLUMNS])
        assert all(isinstance(i, str) and i for i in typed.column("item_id").to_pylist())
        assert all(p is None or (math.isfinite(p) and p >= 0) for p in typed.column("price").to_pylist())
        assert set(rejects["reason"]) <= REASONS
        for r in rejects["row"]:
            json.loads(r)
        reliability["handled"] += len(rows)

    check()


# ------------------------------------------------------------------------------ files through the Ray readers
GOOD = st.fixed_dictionaries({"user_id": st.sampled_from(["u1", "u2", "u3"]), "item_id": st.sampled_from(list(CATALOGUE)),
                              "timestamp": st.integers(1_300_000_000, 1_500_000_000)})
BROKEN_LINE = st.one_of(
    st.binary(min_size=1, max_size=30).filter(lambda b: b"\n" not in b and b"\r" not in b and b.strip()),
    st.sampled_from([b'{"user_id": "u1", "item_id": ', b"\xff\xfe\x00garbage", b'{"user_id": "u\xe9", "item_id": "a", "timestamp": 1}',
                     b"[1, 2, 3]", b'"just a string"', b"u1,a", b"u1,a,1400000000,extra,fields", b"\xc3\x28,a,1"]),
)


def _encode_jsonl(rec: dict) -> bytes:
    return json.dumps(rec).encode()


def _encode_csv(rec: dict) -> bytes:
    return f'{rec["user_id"]},{rec["item_id"]},{rec["timestamp"]}'.encode()


@pytest.mark.integration
@pytest.mark.usefixtures("ray_local")
@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_text_files_with_broken_lines_are_read_row_for_row(fmt, reliability):
    """Files of good and broken lines (invalid UTF-8, cut-off JSON, wrong field counts): every
    non-blank line becomes one row, and every broken one is rejected as unparsable."""
    from distillery.data.sources import read_table

    reliability.update(tried=0, handled=0, rows_lost=0)
    encode = _encode_jsonl if fmt == "jsonl" else _encode_csv

    @settings(FUZZ, max_examples=8)
    @given(st.lists(st.lists(st.one_of(GOOD.map(lambda r: (True, r)), BROKEN_LINE.map(lambda b: (False, b))),
                             min_size=1, max_size=30), min_size=1, max_size=3))
    def check(files):
        with tempfile.TemporaryDirectory() as d:
            broken = 0
            for i, lines in enumerate(files):
                body = [b"user_id,item_id,timestamp"] if fmt == "csv" else []
                for ok, value in lines:
                    line = encode(value) if ok else value
                    broken += not ok and _unparsable(line, fmt)
                    body.append(line)
                Path(d, f"part-{i}.{fmt}").write_bytes(b"\n".join(body) + b"\n")
            n = sum(len(lines) for lines in files)
            reliability["tried"] += n
            rows = read_table(d).to_pandas()
            reliability["rows_lost"] += n - len(rows)
            assert len(rows) == n
            out = validate_rows(rows, table="interactions", catalogue=CATALOGUE, buckets=4)
            assert (out["_reason"] == "unparsable_row").sum() == broken
            _check_rows(_typed(mark_duplicates(out), INTERACTION_COLUMNS), n, INTERACTION_COLUMNS)
            reliability["handled"] += n

    check()


def _unparsable(line: bytes, fmt: str) -> bool:
    """What the reader must reject: not UTF-8, or not one JSON object / not three CSV fields.
    (Random bytes can spell a valid line, so this is decided per line, not assumed.)"""
    import csv

    from distillery.data.sources import _parse_record

    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return True
    try:
        if fmt == "jsonl":
            return not isinstance(_parse_record(text), dict)
        return len(next(csv.reader([text]))) != 3
    except Exception:
        return True


@pytest.mark.integration
@pytest.mark.slow  # ~30 s on 2 cores: Ray Data starts one read per schema, then unions them
@pytest.mark.usefixtures("ray_local")
def test_parquet_files_whose_schemas_disagree_are_read_together(tmp_path, reliability):
    """One column typed three ways across files, a column only some files have, an all-null one."""
    from distillery.data.sources import read_table

    n_rows = 0
    tables = [
        pa.table({"user_id": ["u1", "u2"], "item_id": ["a", "b"], "timestamp": [1_400_000_000, 1_400_000_001],
                  "note": [1, 2]}),
        pa.table({"user_id": ["u3", None], "item_id": ["c", "a"], "timestamp": ["1400000002", "2014-03-05"],
                  "note": ["x", None], "clicked": [1, 0]}),
        pa.table({"user_id": [1, 2], "item_id": ["a", "zz"], "timestamp": [1.4e9, float("nan")],
                  "note": pa.array([None, None], pa.null())}),
        pa.table({"user_id": ["u4"], "item_id": ["b"], "position": [3], "note": [[1, 2]]}),
    ]
    for i, t in enumerate(tables):
        pq.write_table(t, tmp_path / f"part-{i}.parquet")
        n_rows += t.num_rows
    reliability.update(tried=n_rows)
    rows = read_table(str(tmp_path)).to_pandas()
    assert len(rows) == n_rows
    out = _typed(mark_duplicates(validate_rows(rows, table="interactions", catalogue=CATALOGUE, buckets=4)),
                 INTERACTION_COLUMNS)
    _check_rows(out, n_rows, INTERACTION_COLUMNS)
    clean = out.filter(pa.compute.is_null(out["_reason"])).to_pylist()
    assert {(r["user_id"], r["item_id"]) for r in clean} >= {("u1", "a"), ("u2", "b"), ("u3", "c"), ("1", "a"), ("u4", "b")}
    assert sorted(r["note"] for r in clean if r["user_id"] in ("u1", "u3", "u4")) == ["1", "[1, 2]", "x"]
    reliability.update(handled=n_rows, rows_lost=n_rows - out.num_rows)


# ------------------------------------------------------------------------------ the HTTP API from its OpenAPI schema
ANY_JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 64), 2 ** 64),
                                  st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30)),
                        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                        max_leaves=12)


def from_schema(schema: dict, components: dict, depth: int = 0) -> st.SearchStrategy:
    """Values for a JSON schema, each part now and then replaced by any JSON at all, keys left out
    or unknown keys added: mostly near-valid requests, the kind that reach the deepest code."""
    if "$ref" in schema:
        return from_schema(components[schema["$ref"].split("/")[-1]], components, depth)
    if "anyOf" in schema:
        return st.one_of([from_schema(s, components, depth) for s in schema["anyOf"]])
    kind = schema.get("type")
    if kind == "object" and depth < 4:
        props = {k: from_schema(v, components, depth + 1) for k, v in schema.get("properties", {}).items()}
        base = st.fixed_dictionaries({}, optional=props)
        exact = st.fixed_dictionaries({k: props[k] for k in schema.get("required", [])},
                                      optional={k: v for k, v in props.items() if k not in schema.get("required", [])})
        return st.one_of(exact, exact, base, st.builds(lambda d, x: {**d, **x}, exact,
                                                       st.dictionaries(st.text(max_size=6), ANY_JSON, max_size=2)))
    if kind == "array":
        item = from_schema(schema.get("items", {}), components, depth + 1)
        hi = schema.get("maxItems", 20)
        return st.one_of(st.lists(item, max_size=min(hi, 8)), st.lists(item, min_size=hi, max_size=hi + 1) if hi < 300 else st.nothing())
    if kind == "integer":
        lo, hi = schema.get("minimum", -(2 ** 40)), schema.get("maximum", 2 ** 40)
        return st.one_of(st.integers(lo, hi), st.integers(lo - 3, lo), st.integers(hi, hi + 3), st.integers(-(2 ** 70), 2 ** 70))
    if kind == "string":
        n = schema.get("maxLength", 64)
        return st.one_of(st.sampled_from(["sku-1", "sku-2", "sku-9", "red gel pen", "", "\u2028", "caf\u00e9 \U0001f600"]),
                         st.text(max_size=12), st.text(min_size=n, max_size=n + 2) if n <= 1000 else st.nothing())
    if kind == "boolean":
        return st.booleans()
    return ANY_JSON


@pytest.fixture(scope="module")
def live_api(tiny_bundle):
    """The HTTP app over the tiny bundle, served by uvicorn on a loopback port in this process."""
    import uvicorn
    from distillery.serving import api
    from distillery.serving.service import Service

    app = api.create_app(api.LocalBackend(Service.from_bundle(tiny_bundle)), max_body_bytes=16_384, api_key="")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", app.openapi()
    server.should_exit = True
    thread.join(timeout=10)


def test_requests_generated_from_the_openapi_schema_never_get_a_5xx(live_api, reliability):
    import requests

    base, spec = live_api
    components = spec["components"]["schemas"]
    bodies = {path: op["post"]["requestBody"]["content"]["application/json"]["schema"]
              for path, op in spec["paths"].items() if "post" in op}
    assert set(bodies) == {"/v1/recommend", "/v1/ctr", *(t.endpoint for t in TASKS.values() if t.classifies)}
    reliability.update(tried=0, handled=0, server_errors_5xx=0)
    statuses: dict[int, int] = {}
    http = requests.Session()

    def send(method, path, **kw):
        reliability["tried"] += 1
        r = http.request(method, base + path, timeout=30, **kw)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        reliability["server_errors_5xx"] += r.status_code >= 500
        assert r.status_code < 500, (path, kw, r.status_code, r.text[:500])
        assert r.status_code == 200 or r.json()["detail"], r.text[:200]  # a 4xx says what was wrong
        reliability["handled"] += 1

    for path, schema in bodies.items():
        @settings(FUZZ, max_examples=200)
        @given(st.one_of(from_schema(schema, components), from_schema(schema, components), ANY_JSON))
        def post(body):
            send("POST", path, json=body)

        post()

    @settings(FUZZ, max_examples=60)
    @given(st.dictionaries(st.sampled_from(["limit", "offset", "x"]),
                           st.one_of(st.integers(-(2 ** 70), 2 ** 70).map(str), st.text(max_size=8)), max_size=3))
    def items(params):
        send("GET", "/v1/items", params=params)

    items()

    @settings(FUZZ, max_examples=40)
    @given(st.sampled_from(list(bodies)), st.binary(max_size=64))
    def raw(path, data):  # bytes that are not JSON, or not UTF-8
        send("POST", path, data=data, headers={"Content-Type": "application/json"})

    raw()
    assert http.get(f"{base}/healthz", timeout=10).json()["status"] == "ok"  # the server is still up
    assert statuses.get(200, 0) > 50 and sum(v for k, v in statuses.items() if 400 <= k < 500) > 50, statuses


def test_oversized_bodies_are_refused_with_413_and_the_server_stays_up(live_api, reliability):
    import requests

    base, _ = live_api
    reliability.update(tried=0, handled=0, server_errors_5xx=0)
    for path, body in [("/v1/intent", {"texts": ["x" * 900] * 20}), ("/v1/recommend", {"history": ["sku-1"] * 5000}),
                       ("/v1/ctr", {"history": [], "candidates": ["sku-1"] * 5000})]:
        reliability["tried"] += 2
        r = requests.post(base + path, json=body, timeout=30)
        assert r.status_code == 413 and "16384-byte limit" in r.json()["detail"]
        chunked = requests.post(base + path, data=iter([json.dumps(body).encode()[i:i + 1000]
                                                        for i in range(0, len(json.dumps(body)), 1000)]),
                                headers={"Content-Type": "application/json"}, timeout=30)
        assert chunked.status_code == 413  # no Content-Length: counted as it arrives
        reliability["handled"] += 2
    assert requests.get(f"{base}/healthz", timeout=10).status_code == 200
