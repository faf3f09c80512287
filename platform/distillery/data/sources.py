"""Readers and adapters: any supported input -> Ray Datasets in the native contract.

`load_sources(data_cfg)` returns {"items", "interactions", "reviews"?} as lazy Ray Datasets whose
rows follow the input contract (docs/data.md) plus `_source` (the file a row came from, for error
messages). Adapters only rename and reshape fields; they never drop an input row (the MIND adapter
keeps a user's history once, though every impression line of hers repeats it). A line that cannot be
parsed becomes a row with `_parse_error` set, which validation turns into a reject.

Formats:
  native   Parquet / JSON lines / CSV / TSV (or a Hugging Face dataset with reader=hf)
  lcrec    LC-Rec `*.inter.json` ({user: [item, ...]}) + `*.item.json` ({item: {title, ...}})
  amazon   Amazon reviews JSON lines (SNAP 2014, 2018 and 2023 field names) + product metadata
  mind     MIND `behaviors.tsv` + `news.tsv`
"""
from __future__ import annotations

import ast
import csv
import json
import os
import urllib.parse

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data

from .. import storage
from ..config import DataConfig
from ..errors import DataError
from .validate import as_text, category_path, valid_unicode

PARQUET = (".parquet", ".pq")
JSON = (".json", ".jsonl", ".ndjson", ".json.gz", ".jsonl.gz")
CSV = (".csv", ".tsv", ".csv.gz", ".tsv.gz")


# ------------------------------------------------------------------------------ file readers
def read_parquet(paths: str | list[str], **kwargs) -> ray.data.Dataset:
    """`ray.data.read_parquet` through Ray Data's task-based Parquet reader. Ray 2.60's default
    reader (DataSourceV2) starts FooterReader actors, new worker processes, for every read to list
    the files' footers: the prepare stage took 12.6 s with it against 5.5 s on ~5k interactions,
    13.7 s against 9.0 s at 100k, and the same within noise at 1M (benchmarks/prepare.py, 2
    cores). Every caller here already knows its files (`read_table` reads each schema on the
    driver; the other stages read the run directory's own parts), so those actors only add
    start-up. Set RAY_DATA_USE_DATASOURCE_V2=1 to keep Ray's default (an input of very many files
    on a large cluster, say)."""
    ctx = ray.data.DataContext.get_current()
    before = ctx.use_datasource_v2
    # read_parquet reads the flag only while it plans the read: it is set for this call and
    # restored, never left changed for other work in the process
    ctx.use_datasource_v2 = before and "RAY_DATA_USE_DATASOURCE_V2" in os.environ
    try:
        return ray.data.read_parquet(paths, **kwargs)
    finally:
        ctx.use_datasource_v2 = before


def _kind(files: list[str], reader: str) -> str:
    if reader != "auto":
        return reader
    kinds = {("parquet" if f.lower().endswith(PARQUET) else "json" if f.lower().endswith(JSON)
              else "csv" if f.lower().endswith(CSV) else "?") for f in files}
    if len(kinds) != 1 or "?" in kinds:
        raise DataError(f"cannot tell the format of {files[:3]}: use .parquet, .jsonl/.json or .csv/.tsv "
                        "files, or set data.reader=parquet|json|csv")
    return kinds.pop()


def _with_source(ds: ray.data.Dataset) -> ray.data.Dataset:
    return ds.rename_columns({"path": "_source"})


def read_table(path: str, reader: str = "auto") -> ray.data.Dataset:
    """Read one source (file, folder of files, or URI) with Ray Data, adding `_source`."""
    if reader == "hf":
        return read_huggingface(path)
    files = storage.list_files(path, PARQUET + JSON + CSV if reader == "auto" else ())
    if not files:
        raise DataError(f"{path} holds no .parquet, .json(l) or .csv/.tsv files")
    kind = _kind(files, reader)
    fs, _ = storage.resolve(files[0])
    local = [storage.resolve(f)[1] for f in files]
    if kind == "parquet":
        # Files whose schemas disagree (an all-null column stored as double, say) cannot share one
        # read; validation normalizes the types, so read each schema group apart and union.
        groups: dict[str, list[str]] = {}
        types: dict[str, set] = {}
        for f in local:
            schema = pq.read_schema(f, filesystem=fs).remove_metadata()
            groups.setdefault(schema.to_string(), []).append(f)
            for field in schema:
                types.setdefault(field.name, set()).add(field.type)
        # A column typed differently across files (int in one, string in another) cannot be
        # concatenated: it is read as text, which validation parses like any text input.
        clash = sorted(n for n, t in types.items() if len(t - {pa.null()}) > 1)
        reads = [read_parquet(g, filesystem=fs, include_paths=True, file_extensions=None) for g in groups.values()]
        if clash:
            reads = [r.map_batches(_columns_as_text, fn_kwargs={"names": clash}, batch_format="pyarrow") for r in reads]
        ds = reads[0].union(*reads[1:]) if len(reads) > 1 else reads[0]
    elif kind == "json":
        # line by line rather than with pyarrow's reader, where one malformed line or one byte that
        # is not UTF-8 fails the whole file: here that line becomes an `unparsable_row` reject
        return _lines(files).map_batches(lambda b: _records(b, dict), batch_format="pandas")
    else:
        # one file per batch: its header is its first line
        return _binary(files).map_batches(_csv_file, batch_format="pandas", batch_size=1, fn_kwargs={
            "delimiter": "\t" if files[0].lower().endswith((".tsv", ".tsv.gz")) else ","})
    return _with_source(ds)


def _columns_as_text(table: pa.Table, names: list[str]) -> pa.Table:
    for name in names:
        if name in table.column_names:
            i = table.column_names.index(name)
            table = table.set_column(i, name, as_text(table.column(name).to_pylist()))
    return table


def read_huggingface(spec: str) -> ray.data.Dataset:
    """`hub/id?name=CONFIG&split=SPLIT` or a `save_to_disk` folder (optionally `?split=`)."""
    import datasets

    base, _, query = spec.partition("?")
    opts = dict(urllib.parse.parse_qsl(query))
    split = opts.get("split")
    try:
        if storage.exists(base) and not storage.is_uri(base):
            loaded = datasets.load_from_disk(base)
        else:
            loaded = datasets.load_dataset(base, opts.get("name"), split=split)
    except Exception as exc:
        raise DataError(f"cannot load Hugging Face dataset {spec!r}: {exc}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split is None:
            if len(loaded) != 1:
                raise DataError(f"{spec} has splits {list(loaded)}: add ?split=NAME")
            split = next(iter(loaded))
        if split not in loaded:
            raise DataError(f"{spec} has no split {split!r} (splits: {list(loaded)})")
        loaded = loaded[split]
    ds = ray.data.from_huggingface(loaded)
    return ds.add_column("_source", lambda batch: pa.array([spec] * len(batch)), batch_format="pyarrow")


def read_lines(path: str) -> ray.data.Dataset:
    """Every non-blank line of the files under `path`: rows {text, _source, _parse_error}."""
    files = storage.list_files(path)
    if not files:
        raise DataError(f"{path} holds no files")
    return _lines(files)


def _binary(files: list[str]) -> ray.data.Dataset:
    fs, _ = storage.resolve(files[0])
    return ray.data.read_binary_files([storage.resolve(f)[1] for f in files], filesystem=fs, include_paths=True,
                                      file_extensions=None)


def _lines(files: list[str]) -> ray.data.Dataset:
    return _binary(files).map_batches(_split_lines, batch_format="pandas", batch_size=1)


def _split_lines(batch: pd.DataFrame) -> pd.DataFrame:
    """Whole files -> their lines. Bytes are split on "\n" and decoded one line at a time: a byte
    that is not UTF-8 costs its line (a reject naming it), not the file, as `read_text`'s decode of
    the whole file would."""
    text, source, error = [], [], []
    for data, path in zip(batch["bytes"], batch["path"]):
        for number, raw in enumerate(data.split(b"\n"), 1):
            raw = raw.rstrip(b"\r")
            if not raw.strip():
                continue
            try:
                text.append(raw.decode("utf-8"))
                error.append(None)
            except UnicodeDecodeError as exc:
                text.append(raw.decode("utf-8", errors="replace"))
                error.append(f"line {number}: byte {exc.start} is not UTF-8")
            source.append(path)
    return pd.DataFrame({"text": pd.Series(text, dtype=object), "_source": pd.Series(source, dtype=object),
                         "_parse_error": pd.Series(error, dtype=object)})


# ------------------------------------------------------------------------------ parsing helpers
def _parse_record(line: str):
    """JSON, or the Python-literal lines of the 2014 SNAP metadata files."""
    try:
        return json.loads(line)
    except ValueError:
        return ast.literal_eval(line)


def _records(batch: pd.DataFrame, convert) -> pd.DataFrame:
    rows = []
    for text, source, bad in zip(batch["text"], batch["_source"], _errors(batch)):
        try:
            if bad:
                raise ValueError(bad)
            rec = _parse_record(text)
            if not isinstance(rec, dict):
                raise ValueError(f"expected an object, got {type(rec).__name__}")
            out = convert(rec)
        except Exception as exc:  # one bad line must not sink the file
            out = {"_parse_error": f"{type(exc).__name__}: {exc}", "_raw": text[:2000]}
        out["_source"] = source
        rows.append(out)
    return _frame(rows)


def _errors(batch: pd.DataFrame) -> list:
    """The decode error of each line, or None (a null can arrive as NaN, which is truthy)."""
    if "_parse_error" not in batch.columns:
        return [None] * len(batch)
    return [e if isinstance(e, str) else None for e in batch["_parse_error"].tolist()]


def _csv_file(batch: pd.DataFrame, delimiter: str) -> pd.DataFrame:
    """One whole CSV/TSV file (header first) -> rows, all strings; a line with the wrong number of
    fields or bytes that are not UTF-8 becomes a `_parse_error` row. Each line is one record:
    quoted fields may not span lines."""
    lines = _split_lines(batch)
    rows, header = [], None
    for text, source, bad in zip(lines["text"], lines["_source"], _errors(lines)):
        try:
            fields = next(csv.reader([text], delimiter=delimiter))
        except (csv.Error, StopIteration) as exc:
            fields, bad = [], bad or f"csv: {exc}"
        if header is None:
            if bad:
                raise DataError(f"{source}: the header line cannot be read ({bad}); fix the first line of the file")
            header = [h.strip().lstrip("\ufeff") for h in fields]
            continue
        if not bad and len(fields) != len(header):
            bad = f"expected {len(header)} fields ({delimiter!r}-separated), got {len(fields)}"
        if bad:
            rows.append({"_parse_error": bad, "_raw": text[:2000], "_source": source})
        else:
            rows.append({**{h: (v if v != "" else None) for h, v in zip(header, fields)}, "_source": source})
    return _frame(rows, columns=tuple(header or ()))


def _frame(rows: list[dict], columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """Rows -> an all-string frame (None for missing), so every block has one schema and
    validation does all type parsing in one place."""
    def norm(v):
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return None
        if isinstance(v, (list, tuple)):
            return valid_unicode(category_path(v)) if v else None
        return valid_unicode(str(v))
    df = pd.DataFrame([{k: norm(v) for k, v in r.items()} for r in rows])
    for col in ("_parse_error", "_raw", "_source", *columns):
        if col not in df.columns:
            df[col] = None
    return df.astype(object).where(df.notna(), None)


def _first(rec: dict, *keys, default=None):
    for k in keys:
        if rec.get(k) not in (None, "", []):
            return rec[k]
    return default


def _join_text(value) -> str | None:
    if isinstance(value, list):
        value = " ".join(str(v) for v in value if v)
    return value or None


# ------------------------------------------------------------------------------ amazon
def amazon_review(rec: dict) -> dict:
    """One review of any of the SNAP 2014 / 2018 / 2023 dumps -> contract review row."""
    if "parent_asin" in rec or "user_id" in rec:  # 2023: timestamps are milliseconds
        ts = rec.get("timestamp")
        return {"user_id": rec.get("user_id"), "item_id": _first(rec, "parent_asin", "asin"),
                "timestamp": ts // 1000 if isinstance(ts, (int, float)) else ts,
                "rating": rec.get("rating"), "title": rec.get("title"), "text": rec.get("text")}
    return {"user_id": rec.get("reviewerID"), "item_id": rec.get("asin"),
            "timestamp": _first(rec, "unixReviewTime", "reviewTime"), "rating": rec.get("overall"),
            "title": rec.get("summary"), "text": rec.get("reviewText")}


def amazon_item(rec: dict) -> dict:
    category = _first(rec, "categories", "category")
    if isinstance(category, list) and category and all(isinstance(c, str) for c in category) and rec.get("main_category"):
        category = [rec["main_category"], *category] if category[0] != rec["main_category"] else category
    elif not category and rec.get("main_category"):
        category = [rec["main_category"]]
    return {"item_id": _first(rec, "parent_asin", "asin"), "title": rec.get("title"),
            "category": category, "brand": _first(rec, "brand", "store"),
            "description": _join_text(rec.get("description")), "price": rec.get("price")}


def _amazon_ds(path: str, reader: str, convert) -> ray.data.Dataset:
    """Amazon JSON lines (or a Hugging Face dataset of the same records) through `convert`."""
    if reader == "hf":
        return read_huggingface(path).map_batches(
            lambda b: _frame([{**convert(r), "_source": r["_source"]} for r in b.to_pylist()]), batch_format="pyarrow")
    return read_lines(path).map_batches(lambda b: _records(b, convert), batch_format="pandas")


# ------------------------------------------------------------------------------ LC-Rec
def _lcrec(cfg: DataConfig) -> dict[str, ray.data.Dataset]:
    def load(path):
        files = storage.list_files(path, (".json",))
        if not files:
            raise DataError(f"{path}: no LC-Rec .json file found")
        try:
            return files[0], json.loads(storage.read_text(files[0]))
        except ValueError as exc:
            raise DataError(f"{files[0]} is not valid JSON: {exc}") from None

    src, inter = load(cfg.interactions)
    rows = [{"user_id": str(u), "item_id": str(i), "position": p, "_source": src}
            for u, seq in inter.items() for p, i in enumerate(seq)]
    src_items, meta = load(cfg.items)
    items = []
    for item_id, rec in meta.items():
        cats = rec.get("categories") or rec.get("category")
        if isinstance(cats, str):
            cats = [c.strip() for c in cats.split(",") if c.strip()]
        items.append({"item_id": str(item_id), "title": rec.get("title"), "description": _join_text(rec.get("description")),
                      "brand": rec.get("brand"), "category": cats, "_source": src_items})
    return {"interactions": ray.data.from_pandas(_frame(rows)), "items": ray.data.from_pandas(_frame(items))}


# ------------------------------------------------------------------------------ MIND
MIND_NEWS = ["item_id", "top_category", "subcategory", "title", "abstract", "url", "title_entities", "abstract_entities"]


def _mind_news(batch: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for text, source, bad in zip(batch["text"], batch["_source"], _errors(batch)):
        parts = text.split("\t")
        if bad or len(parts) < 5:
            bad = bad or f"expected >= 5 tab-separated fields, got {len(parts)}"
            rows.append({"_parse_error": bad, "_raw": text[:2000], "_source": source})
            continue
        rec = dict(zip(MIND_NEWS, parts))
        rows.append({"item_id": rec["item_id"], "title": rec.get("title"), "description": rec.get("abstract"),
                     "category": [rec["top_category"], rec["subcategory"]], "url": rec.get("url"), "_source": source})
    return _frame(rows)


def _mind_behaviors(batch: pd.DataFrame) -> pd.DataFrame:
    """behaviors.tsv line -> one row per shown candidate, plus the pre-period history rows.

    History rows carry `history_rank` (0..n-1, oldest first) and timestamp 0 + rank: MIND gives their
    order but no time, and every history click precedes the user's impressions.
    """
    rows = []
    for text, source, bad in zip(batch["text"], batch["_source"], _errors(batch)):
        parts = text.split("\t")
        if bad or len(parts) != 5:
            bad = bad or f"expected 5 tab-separated fields, got {len(parts)}"
            rows.append({"_parse_error": bad, "_raw": text[:2000], "_source": source})
            continue
        imp_id, user, time, history, shown = parts
        for slot, tok in enumerate(shown.split()):
            item, _, label = tok.rpartition("-")
            rows.append({"user_id": user, "item_id": item or tok, "timestamp": time, "clicked": label,
                         "impression_id": imp_id, "slot": slot, "history_rank": None, "_source": source})
        for rank, item in enumerate(history.split()):
            rows.append({"user_id": user, "item_id": item, "timestamp": rank, "clicked": 1, "history_rank": rank,
                         "impression_id": None, "slot": None, "_source": source, "_history_of": imp_id})
    return _frame(rows, columns=("_history_of", "history_rank", "user_id", "item_id", "timestamp", "clicked",
                                 "impression_id", "slot"))


def _first_history_only(group: pd.DataFrame) -> pd.DataFrame:
    """A user's history repeats on every impression line; keep one line's copy (the same for any
    line that is picked: MIND gives a user one history for the whole log)."""
    hist = group["_history_of"].notna()
    if hist.any():
        keep = group.loc[hist, "_history_of"].astype(str).min()
        group = group[~hist | (group["_history_of"] == keep)]
    return group.drop(columns=["_history_of"])


def group_by(ds: ray.data.Dataset, key: str, shuffle: str, num_partitions: int | None = None):
    """`ds.groupby(key)` with the `data.shuffle` strategy. The per-user groupbys move every row once;
    Ray's default hash shuffle starts aggregator actors per groupby, the task-based sort shuffle does
    not, and made the prepare stage 2.1x faster at 100k rows and 1.6x at 1M on 2 cores
    (benchmarks/results/prepare.json). The strategy is set on this dataset's own DataContext (each
    read takes a copy of the process's when it is created, and datasets derived from it share that
    copy), so the process-wide context that other work reads is left as it was."""
    from ray.data.context import ShuffleStrategy

    ds.context.shuffle_strategy = ShuffleStrategy(shuffle)
    return ds.groupby(key, num_partitions=num_partitions)


def _mind(cfg: DataConfig) -> dict[str, ray.data.Dataset]:
    behaviors = read_lines(cfg.interactions).map_batches(_mind_behaviors, batch_format="pandas")
    interactions = group_by(behaviors, "user_id", cfg.shuffle).map_groups(_first_history_only, batch_format="pandas")
    items = read_lines(cfg.items).map_batches(_mind_news, batch_format="pandas")
    return {"interactions": interactions, "items": items}


# ------------------------------------------------------------------------------ entry point
def load_sources(cfg: DataConfig) -> dict[str, ray.data.Dataset]:
    """Lazy Ray Datasets for the configured input. Paths in cfg must already be resolved."""
    if cfg.format in ("native", "synthetic"):
        out = {"items": read_table(cfg.items, cfg.reader), "interactions": read_table(cfg.interactions, cfg.reader)}
        if cfg.reviews:
            out["reviews"] = read_table(cfg.reviews, cfg.reader)
        return out
    if cfg.format == "amazon":
        reviews = _amazon_ds(cfg.interactions, cfg.reader, amazon_review)
        return {"items": _amazon_ds(cfg.items, cfg.reader, amazon_item), "reviews": reviews,
                # every review is also an implicit positive interaction
                "interactions": reviews.drop_columns(["rating", "title", "text"])}
    if cfg.format == "lcrec":
        return _lcrec(cfg)
    if cfg.format == "mind":
        return _mind(cfg)
    raise DataError(f"unknown data.format {cfg.format!r}")
