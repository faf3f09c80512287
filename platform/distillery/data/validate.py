"""Row validation and quarantine.

Every input row comes out either clean (normalized to the contract's types) or as a reject with a
`reason` and the `column` it concerns. The functions here are pure pandas so Ray Data can run them
in `map_batches` / `map_groups`, and unit tests can call them directly.

Reasons (first failing check wins):
  unparsable_row        the adapter could not parse the line (column: row)
  null_id               user_id / item_id null or empty
  unknown_item          item_id not in the validated catalogue
  missing_order         neither timestamp nor position given
  unparsable_timestamp  timestamp is neither a number nor a date string
  timestamp_out_of_range  timestamp < 0 or after 2100 (milliseconds instead of seconds?)
  unparsable_position   position not a non-negative integer
  unparsable_slot       slot given but not a non-negative integer (below 2^31)
  clicked_not_binary    clicked given but not 0/1 (null or absent: an implicit positive, 1)
  rating_not_numeric / rating_out_of_range
  empty_text            review with neither title nor text
  duplicate             exact copy of another row of the same table (the first copy is kept)
  duplicate_id          catalogue row whose item_id was already seen (the first is kept)
  price_not_numeric / price_out_of_range
"""
from __future__ import annotations

import json
import math
from typing import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa

INTERNAL = ("_source", "_reason", "_column", "_row", "_bucket", "_order", "_parse_error", "_raw")
MAX_TIMESTAMP = 4_102_444_800  # 2100-01-01

INTERACTION_COLUMNS = {
    "user_id": pa.string(), "item_id": pa.string(), "timestamp": pa.int64(), "position": pa.int64(),
    "clicked": pa.int8(), "query": pa.string(), "impression_id": pa.string(), "slot": pa.int32(),
}
REVIEW_COLUMNS = {
    "user_id": pa.string(), "item_id": pa.string(), "timestamp": pa.int64(), "rating": pa.float64(),
    "title": pa.string(), "text": pa.string(),
}
ITEM_COLUMNS = {
    "item_id": pa.string(), "title": pa.string(), "category": pa.string(), "brand": pa.string(),
    "description": pa.string(), "price": pa.float64(),
}
REJECT_SCHEMA = pa.schema([("table", pa.string()), ("source", pa.string()), ("reason", pa.string()),
                           ("column", pa.string()), ("row", pa.string())])


# ------------------------------------------------------------------------------ value parsing
def valid_unicode(v):
    """A string with a lone surrogate ("\ud800", which JSON escapes can spell and which has no
    UTF-8 form) gets U+FFFD in its place, as undecodable bytes do; anything else is returned as is."""
    if isinstance(v, str) and not v.isascii():
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return v.encode("utf-8", "replace").decode("utf-8")
    return v


def _valid_text(df: pd.DataFrame) -> pd.DataFrame:
    cols = {c: [valid_unicode(v) for v in df[c].tolist()] for c in df.columns if df[c].dtype == object}
    return df.assign(**{c: pd.Series(v, index=df.index, dtype=object) for c, v in cols.items()}) if cols else df


def _text(series: pd.Series) -> pd.Series:
    """Strings with surrounding space stripped; null stays null, '' becomes null."""
    def conv(v):
        if _isnull(v):
            return None
        if isinstance(v, float) and v.is_integer():  # ids read as floats from CSV/JSON
            v = int(v)
        if isinstance(v, bytes):
            v = v.decode("utf-8", errors="replace")
        s = str(v).strip()
        return s or None
    return pd.Series([conv(v) for v in series.tolist()], index=series.index, dtype=object)


def parse_timestamp(series: pd.Series) -> pd.Series:
    """Seconds since epoch as float (NaN where unparsable). Numbers, numeric strings and dates."""
    values = series.astype(object).where(series.notna(), None)
    num = pd.to_numeric(values.map(lambda v: v.strip() if isinstance(v, str) else v)
                        .map(lambda v: None if isinstance(v, (bool, np.bool_)) else v), errors="coerce")
    num = num.astype(float)
    need = num.isna() & values.map(lambda v: isinstance(v, str) and bool(v.strip()))
    if need.any():
        dt = pd.to_datetime(values[need].astype(str), errors="coerce", utc=True, format="mixed")
        secs = (dt - pd.Timestamp("1970-01-01", tz="UTC")) / pd.Timedelta(seconds=1)
        num.loc[need] = secs.astype(float)
    num[~np.isfinite(num)] = np.nan
    return np.floor(num)


_BINARY = {0: 0, 1: 1, "0": 0, "1": 1, "true": 1, "false": 0}


def parse_binary(series: pd.Series) -> pd.Series:
    def conv(v):
        if isinstance(v, (bool, np.bool_)):
            return int(v)
        if isinstance(v, (int, np.integer)) or (isinstance(v, (float, np.floating)) and float(v).is_integer()):
            return _BINARY.get(int(v))
        if isinstance(v, str):  # "1.0": a CSV written by pandas from a float column (one with nulls)
            v = v.strip().lower()
            return _BINARY.get(v.removesuffix(".0") if v.endswith(".0") and v[:-2] in ("0", "1") else v)
        return None
    return pd.Series([conv(v) for v in series.tolist()], index=series.index, dtype=object)


def _jsonable(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        return None if not math.isfinite(float(v)) else float(v)
    if isinstance(v, np.ndarray):
        return [_jsonable(x) for x in v.tolist()]
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace")
    if v is None or isinstance(v, (str, int, bool)):
        return v
    return str(v)


def as_text(values: list) -> pa.Array:
    """Any values -> a string array: strings as they are, the rest as JSON, null stays null."""
    return pa.array([None if _isnull(v) else v if isinstance(v, str)
                     else json.dumps(_jsonable(v), ensure_ascii=False) for v in values], type=pa.string())


def row_json(df: pd.DataFrame) -> pd.Series:
    """The original row as JSON; for lines an adapter could not parse, the raw line and the error."""
    cols = [c for c in df.columns if c not in INTERNAL]
    out = []
    for rec in df[cols + [c for c in ("_raw", "_parse_error") if c in df.columns]].to_dict("records"):
        if not _isnull(rec.get("_raw")):
            obj = {"raw": rec["_raw"], "error": rec.get("_parse_error")}
        else:
            obj = {k: _jsonable(v) for k, v in rec.items() if k not in ("_raw", "_parse_error")}
        out.append(json.dumps(obj, ensure_ascii=False))
    return pd.Series(out, index=df.index, dtype=object)


def user_bucket(user_ids: pd.Series, buckets: int) -> np.ndarray:
    """Stable across processes and runs (pandas' hash uses a fixed key)."""
    keys = user_ids.fillna("").astype(str).to_numpy(dtype=object)
    return (pd.util.hash_array(keys) % np.uint64(buckets)).astype(np.int32)


# ------------------------------------------------------------------------------ row rules
class _Reasons:
    def __init__(self, index):
        self.reason = pd.Series(None, index=index, dtype=object)
        self.column = pd.Series(None, index=index, dtype=object)

    def flag(self, mask, reason: str, column: str) -> None:
        mask = pd.Series(mask, index=self.reason.index).fillna(False).astype(bool) & self.reason.isna()
        self.reason[mask] = reason
        self.column[mask] = column


def _interaction_columns(df: pd.DataFrame, out: pd.DataFrame, r: "_Reasons") -> None:
    """An interaction's clicked flag, query, impression and slot into `out`, rejects into `r`."""
    if "clicked" in df.columns:
        clicked = parse_binary(df["clicked"])
        given = df["clicked"].notna()
        r.flag(given & clicked.isna(), "clicked_not_binary", "clicked")
        # null = absent (files whose columns differ are read together, padded with nulls)
        out["clicked"] = clicked.where(given, 1).fillna(1)
    else:
        out["clicked"] = 1  # absent = implicit positive
    out["query"] = _text(df["query"]) if "query" in df.columns else None
    out["impression_id"] = _text(df["impression_id"]) if "impression_id" in df.columns else None
    if "slot" in df.columns:  # null = unknown slot; anything else must be a slot number, not be cast into one
        slot, given = pd.to_numeric(df["slot"], errors="coerce").astype(float), df["slot"].notna()
        r.flag(given & (slot.isna() | (slot < 0) | (slot != np.floor(slot)) | (slot >= 2 ** 31)), "unparsable_slot", "slot")
        out["slot"] = slot.where(given)
    else:
        out["slot"] = pd.Series(np.nan, index=df.index)


def _review_columns(df: pd.DataFrame, out: pd.DataFrame, r: "_Reasons", rating_range) -> None:
    """A review's rating, title and text into `out`, rejects into `r`."""
    rating = pd.to_numeric(df["rating"], errors="coerce") if "rating" in df.columns else pd.Series(np.nan, index=df.index)
    if "rating" in df.columns:
        given = df["rating"].notna()
        r.flag(given & rating.isna(), "rating_not_numeric", "rating")
        lo, hi = rating_range
        r.flag(given & ((rating < lo) | (rating > hi)), "rating_out_of_range", "rating")
    out["rating"] = rating
    out["title"] = _text(df["title"]) if "title" in df.columns else None
    out["text"] = _text(df["text"]) if "text" in df.columns else None
    r.flag(out["title"].isna() & out["text"].isna(), "empty_text", "text")


def validate_rows(batch: pd.DataFrame, *, table: str, catalogue, rating_range=(1.0, 5.0),
                  buckets: int = 16) -> pd.DataFrame:
    """Normalize one batch of interactions or reviews and mark rejects (reason/column/row)."""
    if table not in ("interactions", "reviews"):
        raise ValueError(f"unknown table {table!r}")
    spec = INTERACTION_COLUMNS if table == "interactions" else REVIEW_COLUMNS
    df = _valid_text(batch.reset_index(drop=True))
    r = _Reasons(df.index)
    out = pd.DataFrame(index=df.index)
    if "_parse_error" in df.columns:
        r.flag(df["_parse_error"].notna(), "unparsable_row", "row")
    for col in ("user_id", "item_id"):
        out[col] = _text(df[col]) if col in df.columns else pd.Series(None, index=df.index, dtype=object)
        r.flag(out[col].isna(), "null_id", col)
    r.flag(~out["item_id"].isin(catalogue) & out["item_id"].notna(), "unknown_item", "item_id")

    has_ts, has_pos = "timestamp" in df.columns, "position" in df.columns
    ts = parse_timestamp(df["timestamp"]) if has_ts else pd.Series(np.nan, index=df.index)
    pos = pd.to_numeric(df["position"], errors="coerce").astype(float) if has_pos else pd.Series(np.nan, index=df.index)
    ts_given = df["timestamp"].notna() if has_ts else pd.Series(False, index=df.index)
    pos_given = df["position"].notna() if has_pos else pd.Series(False, index=df.index)
    if table == "interactions":
        r.flag(~ts_given & ~pos_given, "missing_order", "timestamp")
    r.flag(ts_given & ts.isna(), "unparsable_timestamp", "timestamp")
    r.flag(ts_given & ((ts < 0) | (ts > MAX_TIMESTAMP)), "timestamp_out_of_range", "timestamp")
    r.flag(pos_given & (pos.isna() | (pos < 0) | (pos != np.floor(pos))), "unparsable_position", "position")
    out["timestamp"] = ts.where(ts_given)
    out["position"] = pos.where(pos_given)

    if table == "interactions":
        _interaction_columns(df, out, r)
        # Ordering key: timestamp when given, else position within the user.
        out["_order"] = out["timestamp"].where(ts_given, out["position"])
    else:
        _review_columns(df, out, r, rating_range)

    extras = [c for c in df.columns if c not in spec and c not in INTERNAL]
    for c in extras:
        out[c] = df[c]
    out["_source"] = df["_source"] if "_source" in df.columns else table
    out["_reason"] = r.reason
    out["_column"] = r.column
    bad = r.reason.notna()
    out["_row"] = pd.Series(None, index=df.index, dtype=object)
    if bad.any():
        out.loc[bad, "_row"] = row_json(df[bad])
    out["_bucket"] = user_bucket(out["user_id"], buckets)
    return out


def mark_duplicates(group: pd.DataFrame) -> pd.DataFrame:
    """Within one user bucket, flag every exact copy of an earlier clean row as `duplicate`.

    All copies of a row share its user_id, so they share a bucket: bucket-local is global. The
    shuffle that builds the bucket does not keep file order, so rows are ordered by source file
    first: the copy kept is the one from the file that sorts first, on every run.
    """
    df = group.sort_values("_source", kind="stable") if "_source" in group.columns else group
    df = df.reset_index(drop=True)
    keys = [c for c in df.columns if c not in INTERNAL]
    clean = df["_reason"].isna()
    if clean.any():
        sig = pd.DataFrame({c: df.loc[clean, c].map(lambda v: "\x00" if _isnull(v) else repr(_jsonable(v)))
                            for c in keys})
        dup = sig.duplicated(keep="first")
        idx = dup[dup].index
        if len(idx):
            df.loc[idx, "_reason"] = "duplicate"
            df.loc[idx, "_column"] = "row"
            df.loc[idx, "_row"] = row_json(df.loc[idx])
    return df


def _isnull(v) -> bool:
    if v is None:
        return True
    if isinstance(v, (str, bytes, list, tuple, dict, np.ndarray)):
        return False
    try:
        return bool(pd.isna(v))  # NaN, NaT, pd.NA
    except (TypeError, ValueError):
        return False


# ------------------------------------------------------------------------------ catalogue
def category_path(value) -> str | None:
    """Normalize a category to 'A > B > C' (accepts lists, nested lists and '>'/'|' strings)."""
    if _isnull(value):
        return None
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if value and isinstance(value[0], (list, tuple, np.ndarray)):
            value = list(value[0])  # Amazon 2014: list of paths; the first is the main one
        parts = [str(p).strip() for p in value if not _isnull(p) and str(p).strip()]
    else:
        text = str(value)
        sep = " > " if " > " in text else ">" if ">" in text else "|" if "|" in text else None
        parts = [p.strip() for p in text.split(sep)] if sep else [text.strip()]
        parts = [p for p in parts if p]
    return " > ".join(parts) or None


def validate_items(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (clean catalogue, rejects). Items need only an id: text falls back title -> description -> category."""
    df = _valid_text(df.reset_index(drop=True))
    r = _Reasons(df.index)
    out = pd.DataFrame(index=df.index)
    if "_parse_error" in df.columns:
        r.flag(df["_parse_error"].notna(), "unparsable_row", "row")
    out["item_id"] = _text(df["item_id"]) if "item_id" in df.columns else pd.Series(None, index=df.index, dtype=object)
    r.flag(out["item_id"].isna(), "null_id", "item_id")
    for col in ("title", "brand", "description"):
        out[col] = _text(df[col]) if col in df.columns else None
    out["category"] = [category_path(v) for v in df["category"]] if "category" in df.columns else None
    if "price" in df.columns:
        raw = df["price"].map(lambda v: v.replace("$", "").replace(",", "").strip() if isinstance(v, str) else v)
        price = pd.to_numeric(raw, errors="coerce")
        given = df["price"].map(lambda v: not _isnull(v) and not (isinstance(v, str) and not v.strip()))
        r.flag(given & price.isna(), "price_not_numeric", "price")
        r.flag(given & ((price < 0) | ~np.isfinite(price.fillna(0))), "price_out_of_range", "price")
        out["price"] = price
    else:
        out["price"] = np.nan
    seen = out["item_id"].where(r.reason.isna())
    r.flag(seen.notna() & seen.duplicated(keep="first"), "duplicate_id", "item_id")
    for c in df.columns:
        if c not in ITEM_COLUMNS and c not in INTERNAL:
            out[c] = df[c]
    out["_source"] = df["_source"] if "_source" in df.columns else "items"
    bad = r.reason.notna()
    rejects = pd.DataFrame({
        "table": "items", "source": out.loc[bad, "_source"].astype(str), "reason": r.reason[bad],
        "column": r.column[bad], "row": row_json(df[bad]) if bad.any() else pd.Series(dtype=object),
    })
    return out[~bad].reset_index(drop=True), rejects.reset_index(drop=True)


# ------------------------------------------------------------------------------ arrow output
def to_arrow(df: pd.DataFrame, spec: dict[str, pa.DataType], extra: Iterable[str] = ()) -> pa.Table:
    """Contract columns with fixed types (so every block has the same schema), then the rest."""
    arrays, names = [], []
    for name, typ in spec.items():
        col = df[name] if name in df.columns else pd.Series(None, index=df.index, dtype=object)
        if pa.types.is_integer(typ):
            col = pd.to_numeric(col, errors="coerce")
            arrays.append(pa.array(col.to_numpy(dtype=float), type=pa.float64(), from_pandas=True).cast(typ, safe=False))
        elif pa.types.is_floating(typ):
            arrays.append(pa.array(pd.to_numeric(col, errors="coerce").to_numpy(dtype=float), type=typ, from_pandas=True))
        else:
            arrays.append(pa.array(col.astype(object).where(col.notna(), None).tolist(), type=typ))
        names.append(name)
    for name in extra:
        if name in df.columns and name not in spec:
            try:
                arrays.append(pa.Array.from_pandas(df[name]))
            except (pa.ArrowException, TypeError, ValueError, OverflowError):
                arrays.append(as_text(df[name].tolist()))  # mixed types (3 and "3"): kept, as text
            names.append(name)
    return pa.Table.from_arrays(arrays, names=names)
