"""Every quarantine rule, on rows built here; and the no-row-lost invariant."""
import json

import numpy as np
import pandas as pd
import pytest

from distillery.data.validate import (category_path, mark_duplicates, parse_timestamp, validate_items,
                                      validate_rows)

CATALOGUE = np.array(["a", "b", "c"], dtype=object)


def _inter(rows):
    df = pd.DataFrame(rows)
    df["_source"] = "log.parquet"
    return validate_rows(df, table="interactions", catalogue=CATALOGUE, buckets=4)


def _reasons(out):
    return list(out["_reason"].where(out["_reason"].notna(), None))


@pytest.mark.parametrize("row, reason, column", [
    ({"user_id": None, "item_id": "a", "timestamp": 1}, "null_id", "user_id"),
    ({"user_id": "  ", "item_id": "a", "timestamp": 1}, "null_id", "user_id"),
    ({"user_id": "u", "item_id": None, "timestamp": 1}, "null_id", "item_id"),
    ({"user_id": "u", "item_id": "zzz", "timestamp": 1}, "unknown_item", "item_id"),
    ({"user_id": "u", "item_id": "a", "timestamp": "yesterday-ish"}, "unparsable_timestamp", "timestamp"),
    ({"user_id": "u", "item_id": "a", "timestamp": -5}, "timestamp_out_of_range", "timestamp"),
    ({"user_id": "u", "item_id": "a", "timestamp": 1_700_000_000_000}, "timestamp_out_of_range", "timestamp"),
    ({"user_id": "u", "item_id": "a", "timestamp": float("inf")}, "unparsable_timestamp", "timestamp"),
    ({"user_id": "u", "item_id": "a", "timestamp": None}, "missing_order", "timestamp"),
    ({"user_id": "u", "item_id": "a", "timestamp": 1, "clicked": 2}, "clicked_not_binary", "clicked"),
    ({"user_id": "u", "item_id": "a", "timestamp": 1, "clicked": "maybe"}, "clicked_not_binary", "clicked"),
])
def test_interaction_rules(row, reason, column):
    good = {"user_id": "ok", "item_id": "b", "timestamp": 5, "clicked": 1}
    out = _inter([good, row] if "clicked" in row else [{k: v for k, v in good.items() if k != "clicked"}, row])
    assert _reasons(out) == [None, reason]
    assert out["_column"].iloc[1] == column
    original = json.loads(out["_row"].iloc[1])  # the reject keeps the original row
    assert set(original) >= {"user_id", "item_id"}


def test_values_are_normalized():
    out = _inter([
        {"user_id": 7, "item_id": "a", "timestamp": "2023-11-14T22:13:20Z", "clicked": "true", "query": " ink "},
        {"user_id": "u", "item_id": "b", "timestamp": "1700000000", "clicked": False, "query": ""},
    ])
    assert _reasons(out) == [None, None]
    assert out["user_id"].tolist() == ["7", "u"]
    assert out["timestamp"].tolist() == [1_700_000_000, 1_700_000_000]
    assert out["clicked"].tolist() == [1, 0]
    assert out["query"].tolist() == ["ink", None]


def test_a_slot_is_a_non_negative_integer_or_null_and_clicked_reads_pandas_floats_in_csv():
    df = {"user_id": ["u"] * 7, "item_id": ["a"] * 7, "timestamp": list(range(7)),
          "slot": [3, None, "top", 2.7, -1, 5e9, "4"], "clicked": ["1.0", "0.0", "1", "0", "1", "1", "2.0"]}
    out = _inter(df)
    assert _reasons(out) == [None, None, "unparsable_slot", "unparsable_slot", "unparsable_slot", "unparsable_slot",
                             "clicked_not_binary"]
    assert out["clicked"].tolist()[:2] == [1, 0] and out["slot"].tolist()[0] == 3 and pd.isna(out["slot"].tolist()[1])


def test_position_orders_when_no_timestamp():
    df = pd.DataFrame({"user_id": ["u"] * 3, "item_id": ["a", "b", "c"], "position": [0, 1, "x"]})
    out = validate_rows(df, table="interactions", catalogue=CATALOGUE)
    assert _reasons(out) == [None, None, "unparsable_position"]
    assert out["_order"].tolist()[:2] == [0, 1]
    assert out["clicked"].tolist() == [1, 1, 1]  # absent clicked = implicit positive


def test_review_rules():
    df = pd.DataFrame([
        {"user_id": "u", "item_id": "a", "rating": 5, "title": "great", "text": None},
        {"user_id": "u", "item_id": "b", "rating": 9, "title": "x", "text": "y"},
        {"user_id": "u", "item_id": "b", "rating": "five", "title": "x", "text": "y"},
        {"user_id": "u", "item_id": "c", "rating": 3, "title": " ", "text": None},
    ])
    out = validate_rows(df, table="reviews", catalogue=CATALOGUE, rating_range=(1, 5))
    assert _reasons(out) == [None, "rating_out_of_range", "rating_not_numeric", "empty_text"]
    assert out["_column"].tolist()[1:] == ["rating", "rating", "text"]


def test_unparsable_adapter_rows_keep_the_raw_line():
    df = pd.DataFrame([{"user_id": None, "item_id": None, "_parse_error": "JSONDecodeError: x", "_raw": "{oops"}])
    out = validate_rows(df, table="reviews", catalogue=CATALOGUE)
    assert _reasons(out) == ["unparsable_row"]
    assert json.loads(out["_row"].iloc[0]) == {"raw": "{oops", "error": "JSONDecodeError: x"}


def test_exact_duplicates_keep_the_first_copy():
    rows = [{"user_id": "u", "item_id": "a", "timestamp": 1, "extra": [1, 2]},
            {"user_id": "u", "item_id": "a", "timestamp": 1, "extra": [1, 2]},
            {"user_id": "u", "item_id": "a", "timestamp": 2, "extra": [1, 2]},
            {"user_id": "u", "item_id": "a", "timestamp": 1, "extra": [1, 3]}]
    out = mark_duplicates(_inter(rows))
    assert _reasons(out) == [None, "duplicate", None, None]


def test_no_row_lost_whatever_the_mess():
    rng = np.random.default_rng(0)
    values = [None, "", "a", "b", "zzz", 3, 2.5, float("nan"), "1700000000", -1, True, "x"]
    rows = [{k: values[rng.integers(len(values))] for k in ("user_id", "item_id", "timestamp", "clicked")}
            for _ in range(500)]
    out = mark_duplicates(_inter(rows))
    assert len(out) == 500  # every row is either clean or carries a reason
    rejected = out["_reason"].notna()
    assert out.loc[rejected, "_row"].notna().all()
    clean = out[~rejected]
    assert clean["user_id"].notna().all() and clean["item_id"].isin(CATALOGUE).all()
    assert clean["clicked"].isin([0, 1]).all() and clean["_order"].notna().all()


def test_items_rules_and_category_normalization():
    df = pd.DataFrame([
        {"item_id": "a", "title": "Pen", "category": ["Office", "Writing", "Pens"], "price": "$1,200.50"},
        {"item_id": "a", "title": "Other pen", "category": "Office > Writing", "price": 2},
        {"item_id": None, "title": "x", "category": None, "price": None},
        {"item_id": "b", "title": None, "category": [["Office", "Paper"], ["Other"]], "price": "cheap"},
        {"item_id": "c", "title": None, "category": "Office|Paper", "price": -3},
        {"item_id": "d", "title": "ok", "category": None, "price": None},
    ])
    clean, rejects = validate_items(df)
    assert clean["item_id"].tolist() == ["a", "d"]
    assert clean["category"].iloc[0] == "Office > Writing > Pens" and pd.isna(clean["category"].iloc[1])
    assert clean["price"].tolist()[0] == 1200.5
    assert rejects["reason"].tolist() == ["duplicate_id", "null_id", "price_not_numeric", "price_out_of_range"]
    assert len(clean) + len(rejects) == len(df)
    assert category_path([["Office", "Paper"], ["Other"]]) == "Office > Paper"
    assert category_path("Office|Paper") == "Office > Paper"


def test_parse_timestamp_forms():
    s = pd.Series([1700000000, "1700000000", 1700000000.7, "11/11/2019 9:05:58 AM", "nope", None, True], dtype=object)
    got = parse_timestamp(s).tolist()
    assert got[:4] == [1700000000, 1700000000, 1700000000, 1573463158]
    assert all(np.isnan(v) for v in got[4:])
