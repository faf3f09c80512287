"""What the Office benchmarks share: where the data is and how a run config is made for it.

The data folder is `--data`, else $DISTILLERY_SHARED_DATA/amazon14_office_products_lcrec, else
../shared/data/amazon14_office_products_lcrec beside the project (the LC-Rec Office data in the
native contract: interactions.parquet, items.parquet).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

from distillery.config import RunConfig, load_config  # noqa: E402


def parser(doc: str, *, work: str, work_help: str, out: str) -> argparse.ArgumentParser:
    """The options every Office benchmark takes: --data, --config, --work, --out and overrides."""
    shared = Path(os.environ.get("DISTILLERY_SHARED_DATA", ROOT.parent / "shared" / "data"))
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(shared / "amazon14_office_products_lcrec"),
                   help="folder with interactions.parquet and items.parquet (LC-Rec Office in the native contract)")
    p.add_argument("--config", default=str(ROOT / "configs" / "amazon.yaml"), help="run config")
    p.add_argument("--work", default=work, help=work_help)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / out), help="results JSON")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p


def config(args: argparse.Namespace, run_dir: str | Path, *overrides: str) -> RunConfig | None:
    """The run config for `args.data` in `run_dir`, or None (after saying why) when the data is absent.
    A folder with reviews.parquet passes it as data.reviews, and as the log too when it has no
    interactions.parquet (the Magazine reviews: each review is an interaction)."""
    data = Path(args.data)
    log = data / "interactions.parquet" if (data / "interactions.parquet").exists() else data / "reviews.parquet"
    if not log.exists() or not (data / "items.parquet").exists():
        print(f"no data at {data} (items.parquet and interactions.parquet or reviews.parquet): pass --data or set "
              "DISTILLERY_SHARED_DATA")
        return None
    reviews = [f"data.reviews={data / 'reviews.parquet'}"] if (data / "reviews.parquet").exists() else []
    return load_config(args.config, [f"data.interactions={log}", f"data.items={data / 'items.parquet'}", *reviews,
                                     f"run_dir={run_dir}", *overrides, *args.overrides])
