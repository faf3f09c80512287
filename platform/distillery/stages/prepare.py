"""The `prepare` stage: read, validate and quarantine, build task examples, write sharded Parquet.

Output under RUN_DIR/prepare/:
  items.parquet                     catalogue in vocabulary order (idx, item_id, text, category_idx, clicks, ...)
  vocab/{categories,users,intent_labels}.json
  interactions/, reviews/           validated rows (contract columns + unknown extras)
  rejects/                          table, source, reason, column, row (the original row as JSON)
  examples/<task>/<split>/*.parquet recommendation / ctr (EXAMPLE_SCHEMA), intent (INTENT_SCHEMA)
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import ray.data
from ray.data.expressions import col

from .. import storage, warmstart
from ..config import DataConfig, RunConfig, stable_hash
from ..data import examples as ex
from ..data import synthetic
from ..data.sources import group_by, load_sources
from ..data.tables import count_rows, write_dir, write_single
from ..data.validate import (
    INTERACTION_COLUMNS,
    REJECT_SCHEMA,
    REVIEW_COLUMNS,
    mark_duplicates,
    to_arrow,
    validate_items,
    validate_rows,
)
from ..errors import DataError, StageError
from ..layout import PrepareDir, RunLayout
from ..tasks import TASKS, user_examples
from ..tasks.base import PrepareInputs

log = logging.getLogger("distillery.prepare")

INTERNAL_COLUMNS = {"_source": pa.string(), "_reason": pa.string(), "_column": pa.string(), "_row": pa.string(),
                    "_bucket": pa.int32(), "_order": pa.int64()}


# ------------------------------------------------------------------------------ inputs
def synthetic_dir(cfg: RunConfig) -> str:
    return RunLayout(cfg.run_dir).synthetic_data(stable_hash(cfg.data.synthetic)[:12])


def input_config(cfg: RunConfig) -> DataConfig:
    """The data config to read: for `synthetic`, the generated files (made once, cached in run_dir)."""
    if cfg.data.format != "synthetic":
        return cfg.data
    out = synthetic_dir(cfg)
    names = ("items", "interactions", "reviews")
    paths = {n: storage.join(out, f"{n}.parquet") for n in names}
    if not all(storage.exists(p) for p in paths.values()):
        print(f"generating synthetic data into {out} ({cfg.data.synthetic.users} users, {cfg.data.synthetic.items} items)")
        write_tables(synthetic.generate(cfg.data.synthetic), out)
    return cfg.data.model_copy(update={"format": "native", "reader": "parquet", **paths})


def write_tables(tables: dict[str, pa.Table], out_dir: str) -> dict[str, str]:
    paths = {}
    for name, table in tables.items():
        path = storage.join(out_dir, f"{name}.parquet")
        write_single(table, path)
        paths[name] = path
    return paths


def input_paths(cfg: RunConfig) -> list[str]:
    if cfg.data.format == "synthetic":
        return []  # the generator parameters are part of the config hash
    return [p for p in (cfg.data.items, cfg.data.interactions, cfg.data.reviews) if p]


# ------------------------------------------------------------------------------ helpers
def _clean_rows(t: pa.Table) -> pa.Table:
    return t.filter(pc.is_null(t["_reason"]))


def _reject_rows(t: pa.Table) -> pa.Table:
    return t.filter(pc.is_valid(t["_reason"]))


def _as_rejects(t: pa.Table, table: str) -> pa.Table:
    n = t.num_rows
    return pa.table({"table": pa.array([table] * n, pa.string()), "source": t["_source"], "reason": t["_reason"],
                     "column": t["_column"], "row": t["_row"]}, schema=REJECT_SCHEMA)


def _drop_internal(t: pa.Table) -> pa.Table:
    return t.drop_columns([c for c in INTERNAL_COLUMNS if c in t.column_names])


def _typed(spec: dict):
    def fn(df: pd.DataFrame) -> pa.Table:
        extras = [c for c in df.columns if c not in spec and c not in INTERNAL_COLUMNS]
        return to_arrow(df, {**spec, **INTERNAL_COLUMNS}, extras)
    return fn


def _validate_table(src: ray.data.Dataset, table: str, cfg: RunConfig, item_ids: np.ndarray) -> ray.data.Dataset:
    spec = INTERACTION_COLUMNS if table == "interactions" else REVIEW_COLUMNS
    typed = _typed(spec)
    kwargs = dict(table=table, catalogue=item_ids, rating_range=cfg.data.rating_range, buckets=cfg.data.user_buckets)
    rows = src.map_batches(lambda b: typed(validate_rows(b, **kwargs)), batch_format="pandas")
    return (group_by(rows, "_bucket", cfg.data.shuffle, num_partitions=cfg.data.user_buckets)
            .map_groups(lambda g: typed(mark_duplicates(g)), batch_format="pandas").materialize())


def _reject_summary(rejects: ray.data.Dataset) -> pd.DataFrame:
    s = count_rows(rejects, ["table", "reason", "column", "source"]).rename(columns={"count": "rows"})
    return s.sort_values("rows", ascending=False, kind="mergesort").reset_index(drop=True)


def _check_fraction(table: str, total: int, summary: pd.DataFrame, cfg: RunConfig, rejects_dir: str) -> None:
    summary = summary[summary["table"] == table]
    n = int(summary["rows"].sum())
    if total and n / total > cfg.data.max_reject_fraction:
        by_reason = summary.groupby(["reason", "column"])["rows"].sum().sort_values(ascending=False)
        (reason, column), k = by_reason.index[0], int(by_reason.iloc[0])
        top = summary[(summary["reason"] == reason) & (summary["column"] == column)].iloc[0]
        raise DataError(
            f"{table}: {n} of {total} rows rejected ({n / total:.1%}), above data.max_reject_fraction="
            f"{cfg.data.max_reject_fraction}. Dominant reason '{reason}' in column '{column}' ({k} rows), "
            f"mostly from file {top['source']}. The rejected rows are in {rejects_dir}. "
            f"Fix the input, point data.{table} at the right file, or raise data.max_reject_fraction."
        )


def _item_text(items: pd.DataFrame) -> list[str]:
    """"title | brand | category", the description's start standing in for a missing title; an item
    with none of them has the empty text (it is still an ID for recommendation and CTR)."""
    out = []
    for title, brand, cat, desc in zip(items["title"], items["brand"], items["category"], items["description"]):
        desc = ex.text_or_none(desc)
        head = ex.text_or_none(title) or (desc[:200] if desc else None)
        out.append(" | ".join(p for p in (head, ex.text_or_none(brand), ex.text_or_none(cat)) if p))
    return out


def _coverage(items: pd.DataFrame, item_text: list[str], clicks: pd.Series, user_clicks: pd.Series) -> dict:
    """What the catalogue and the log lack, counted: each is a row kept with a documented meaning
    (docs/data.md, "Missing values"), not a reject."""
    def missing(column: str) -> int:
        return int(sum(ex.text_or_none(v) is None for v in items[column]))
    return {
        "items_without": {c: missing(c) for c in ("title", "category", "brand", "description")}
        | {"price": int(pd.to_numeric(items["price"], errors="coerce").isna().sum()),
           "text": int(sum(t == "" for t in item_text))},
        "items_never_clicked": int((clicks.to_numpy() == 0).sum()),
        "users_without_examples": int((user_clicks < 2).sum()),
        "users_with_test_example_only": int((user_clicks == 2).sum()),
    }


def _print_coverage(cov: dict, n_items: int, n_users: int, left_out: list[str]) -> None:
    """`left_out`: the tasks' own lines on the texts or rows their examples left out."""
    w = cov["items_without"]
    parts = [f"{n} of {n_items:,} items have no {c}" for c, n in w.items() if n and c != "text"]
    if not parts and not left_out and not any((cov["items_never_clicked"], cov["users_without_examples"],
                                               cov["users_with_test_example_only"])):
        print("left out or defaulted: nothing (every item has every optional field, every user 3+ clicks)")
        return
    print("left out or defaulted (kept rows, docs/data.md \"Missing values\"):")
    for p in parts:
        print(f"  {p}")
    if w["category"]:
        print(f"  -> those {w['category']:,} items get category 'unknown'; no intent label comes from them")
    if w["text"]:
        print(f"  -> {w['text']:,} items have no text at all: ID-only for recommendation and CTR")
    if cov["items_never_clicked"]:
        print(f"  {cov['items_never_clicked']:,} of {n_items:,} items were never clicked: rankable, never a target")
    if cov["users_without_examples"]:
        print(f"  {cov['users_without_examples']:,} of {n_users:,} users have under 2 clicks: no recommendation example")
    if cov["users_with_test_example_only"]:
        print(f"  {cov['users_with_test_example_only']:,} of {n_users:,} users have 2 clicks: a test example only")
    for line in left_out:
        print(f"  {line}")


# ------------------------------------------------------------------------------ the stage
def run(cfg: RunConfig, out_dir: str) -> dict:
    """Build everything under out_dir; return the manifest fields (counts, examples, rejects)."""
    out = PrepareDir(out_dir)
    data_cfg = input_config(cfg)
    src = load_sources(data_cfg)
    tasks = tuple(cfg.tasks.enabled())
    items, item_rejects, n_items_in = _catalogue(src["items"], data_cfg)
    item_ids = items["item_id"].to_numpy(dtype=object)
    tables = {name: _validate_table(src[name], name, cfg, item_ids) for name in ("interactions", "reviews") if name in src}
    summary, input_rows = _quarantine(tables, item_rejects, n_items_in, cfg, out)

    clean = {n: ds.map_batches(_clean_rows, batch_format="pyarrow").materialize() for n, ds in tables.items()}
    for name, ds in clean.items():
        write_dir(ds.map_batches(_drop_internal, batch_format="pyarrow"), out.table(name),
                   pa.schema(list((INTERACTION_COLUMNS if name == "interactions" else REVIEW_COLUMNS).items())))
    kept = {"items": len(items), **{n: ds.count() for n, ds in clean.items()}}
    by_table = _by_table(summary)
    for name, total in input_rows.items():  # nothing lost: every row is kept or rejected
        if kept[name] + by_table.get(name, 0) != total:
            raise StageError(f"row accounting failed for {name}: {total} in, {kept[name]} kept + "
                             f"{by_table.get(name, 0)} rejected")
    inter, n_inter = clean["interactions"], kept["interactions"]
    if n_inter == 0:
        raise DataError(f"no valid interaction left in {data_cfg.interactions}; see {out.rejects}")

    pop = count_rows(inter.filter(expr=col("clicked") == 1), ["item_id"])
    clicks = pd.Series(pop["count"].to_numpy(), index=pop["item_id"]).reindex(items["item_id"]).fillna(0).astype(int)
    real_impressions = n_inter > int(clicks.sum())
    # one pass over the log gives the users and each one's clicks
    per_user = count_rows(inter, ["user_id", "clicked"])
    users = sorted(set(per_user["user_id"]))
    user_clicks = per_user[per_user["clicked"] == 1].set_index("user_id")["count"].reindex(users).fillna(0)
    item_text = _item_text(items)
    _write_vocabularies(items, item_text, clicks, users, out)
    warmstart.check_catalogue(cfg, out.items)

    counts = {t: {s: 0 for s in ex.SPLITS} for t in tasks}
    inputs = PrepareInputs(cfg=cfg, data=data_cfg, out=out, interactions=inter, reviews=clean.get("reviews"),
                           items=items, item_ids=item_ids, clicks=clicks, real_impressions=real_impressions)
    per_user = tuple(t for t in tasks if TASKS[t].per_user)
    if per_user:
        counts.update(user_examples.build(inputs, per_user))
    infos = {}
    for t in tasks:
        if not TASKS[t].per_user:
            built = TASKS[t].prepare(inputs)
            counts[t], infos[t] = built.counts, built.info

    coverage = _coverage(items, item_text, clicks, user_clicks)
    _print_coverage(coverage, len(items), len(users), [line for t, info in infos.items() for line in TASKS[t].left_out(info)])
    n_rejects = int(summary["rows"].sum())
    return {
        "counts": {"users": len(users), "items": len(items), "interactions": n_inter, "rejects": n_rejects},
        "examples": counts,
        "input_rows": input_rows,
        "rejects_by_table": by_table,
        "rejects_by_reason": {r: int(n) for r, n in summary.groupby("reason")["rows"].sum().items()},
        "ctr_source": "impressions" if real_impressions else f"sampled_negatives(ratio={cfg.tasks.ctr.negative_ratio})",
        "positives": int(clicks.sum()),
        **infos,
        "coverage": coverage,
        "data": {k: v for k, v in data_cfg.model_dump(mode="json").items() if k in ("format", "items", "interactions", "reviews")},
    }


def _catalogue(src: ray.data.Dataset, data_cfg: DataConfig) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """Validated catalogue in vocabulary order (sorted ids), its rejects, and the input row count."""
    raw = src.to_pandas()  # the catalogue is small next to the log: validated on the driver
    items, rejects = validate_items(raw)
    if len(items) == 0:
        raise DataError(f"the catalogue {data_cfg.items} has no valid item: every row was rejected "
                        f"({rejects['reason'].value_counts().to_dict()})")
    return items.sort_values("item_id", kind="mergesort").reset_index(drop=True), rejects, len(raw)


def _quarantine(tables: dict, item_rejects: pd.DataFrame, n_items_in: int, cfg: RunConfig,
                out: PrepareDir) -> tuple[pd.DataFrame, dict]:
    """Write every reject, print the first ones, and fail above data.max_reject_fraction."""
    rejects_dir = out.rejects
    parts = [ray.data.from_arrow(pa.Table.from_pandas(item_rejects, schema=REJECT_SCHEMA, preserve_index=False))]
    for name, ds in tables.items():
        parts.append(ds.map_batches(lambda t, n=name: _as_rejects(_reject_rows(t), n), batch_format="pyarrow"))
    rejects = parts[0].union(*parts[1:]).materialize()
    write_dir(rejects, rejects_dir, REJECT_SCHEMA)
    summary = _reject_summary(rejects)
    input_rows = {"items": n_items_in, **{n: ds.count() for n, ds in tables.items()}}
    _print_rejects(rejects, summary, cfg.data.show_rejects)
    for name, total in input_rows.items():
        _check_fraction(name, total, summary, cfg, rejects_dir)
    return summary, input_rows


def _write_vocabularies(items: pd.DataFrame, item_text: list[str], clicks: pd.Series, users: list[str],
                        out: PrepareDir) -> None:
    categories = ex.RESERVED + sorted({c for c in items["category"] if isinstance(c, str)})
    cat_index = {c: i for i, c in enumerate(categories)}
    catalogue = pd.DataFrame({
        "idx": np.arange(len(items), dtype=np.int32) + len(ex.RESERVED),
        "item_id": items["item_id"], "title": items["title"], "brand": items["brand"],
        "category": items["category"], "category_idx": [cat_index.get(c, ex.UNK) for c in items["category"]],
        "text": item_text, "clicks": clicks.to_numpy(), "price": items["price"],
    })
    write_single(pa.Table.from_pandas(catalogue, preserve_index=False), out.items)
    storage.write_json(out.vocab("categories"), categories)
    storage.write_json(out.vocab("users"), ex.RESERVED + users)


def _by_table(summary: pd.DataFrame) -> dict[str, int]:
    return {t: int(n) for t, n in summary.groupby("table")["rows"].sum().items()}


def _print_rejects(rejects: ray.data.Dataset, summary: pd.DataFrame, show: int) -> None:
    if summary.empty:
        print("validation: no rejected rows")
        return
    print(f"validation: {int(summary['rows'].sum())} rejected rows")
    for r in summary.head(10).itertuples(index=False):
        print(f"  {r.rows:>8}  {r.table:<12} {r.reason:<24} column={r.column:<12} {r.source}")
    for row in rejects.take(show):
        print(f"  e.g. [{row['table']}] {row['reason']}: {row['row'][:160]}")
