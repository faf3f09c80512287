"""Throughput of the `prepare` stage on generated impression logs (2k, 100k and 1M interactions).

    python benchmarks/prepare.py [--sizes 2000,100000,1000000] [--repeats 2] [--shuffles sort_shuffle_pull_based,hash_shuffle]
                                 [--formats parquet,jsonl,csv] [--parquet-readers tasks,actors]

Generates each log once (cached under --work), then runs `prepare` on it with every shuffle strategy
(interactions as Parquet), with the first strategy on the interactions written as each other
format (JSON lines and CSV are parsed line by line, so that a bad line is a reject, not a failed
read: this measures what that costs), and with the first strategy on Parquet through each
Parquet reader: `tasks`, Ray Data's task-based reader that `sources.read_parquet` uses, and
`actors`, Ray 2.60's default, which starts FooterReader actors for every read
(RAY_DATA_USE_DATASOURCE_V2=1). Variants run interleaved, `--repeats` times, in one Ray session.
Writes benchmarks/results/prepare.json and prepare.png. Target: 1M interactions in
under 3 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import platform as stdlib_platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

from distillery import runner  # noqa: E402
from distillery.config import SyntheticConfig, load_config  # noqa: E402
from distillery.data import synthetic  # noqa: E402
from distillery.stages.prepare import write_tables  # noqa: E402

ROWS_PER_USER = 12 * 8  # sessions_per_user x slots of the generator defaults


def make_log(rows: int, work: Path) -> tuple[Path, int]:
    out = work / f"log-{rows}"
    if not (out / "interactions.parquet").exists():
        users = max(50, rows // ROWS_PER_USER)
        cfg = SyntheticConfig(users=users, items=max(200, min(20000, users // 2)), seed=0)
        t0 = time.perf_counter()
        tables = synthetic.generate(cfg)
        write_tables(tables, str(out))
        print(f"generated {tables['interactions'].num_rows} interactions in {time.perf_counter() - t0:.0f}s -> {out}")
    import pyarrow.parquet as pq
    return out, pq.read_metadata(out / "interactions.parquet").num_rows


def interactions_as(log: Path, fmt: str) -> Path:
    """The log's interactions in `fmt`, written once next to the Parquet file."""
    path = log / f"interactions.{fmt}"
    if fmt != "parquet" and not path.exists():
        import pyarrow.csv as pcsv
        import pyarrow.parquet as pq
        table = pq.read_table(log / "interactions.parquet")
        if fmt == "csv":
            pcsv.write_csv(table, path)
        elif fmt == "jsonl":
            table.to_pandas().to_json(path, orient="records", lines=True)
    return path


def run_once(log: Path, run_dir: Path, shuffle: str, fmt: str = "parquet", reader: str = "tasks") -> dict:
    if reader == "actors":
        os.environ["RAY_DATA_USE_DATASOURCE_V2"] = "1"
    else:
        os.environ.pop("RAY_DATA_USE_DATASOURCE_V2", None)
    cfg = load_config(ROOT / "configs" / "amazon.yaml", [
        f"data.interactions={interactions_as(log, fmt)}", f"data.items={log / 'items.parquet'}",
        f"data.reviews={log / 'reviews.parquet'}", f"run_dir={run_dir}", f"data.shuffle={shuffle}",
        "data.user_buckets=16", "data.show_rejects=0"])
    t0 = time.perf_counter()
    manifest = runner.run(cfg, ["prepare"], force=True)["prepare"]
    return {"wall_s": time.perf_counter() - t0, "stage_s": manifest["wall_time_s"], "counts": manifest["counts"],
            "examples": manifest["examples"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="2000,100000,1000000", help="target interaction counts, comma-separated")
    p.add_argument("--repeats", type=int, default=2, help="runs per (size, format, shuffle); the median is reported")
    p.add_argument("--shuffles", default="sort_shuffle_pull_based,hash_shuffle", help="data.shuffle values to compare")
    p.add_argument("--formats", default="parquet,jsonl,csv",
                   help="file formats of the interactions to compare, with the first shuffle (parquet runs every shuffle)")
    p.add_argument("--parquet-readers", default="tasks,actors",
                   help="Parquet readers to compare on Parquet with the first shuffle: tasks (distillery's), actors (Ray's default)")
    p.add_argument("--work", default="/tmp/distillery-bench", help="scratch folder for logs and run dirs")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "prepare.json"), help="result JSON")
    args = p.parse_args()
    if set(args.formats.split(",")) - {"parquet", "jsonl", "csv"}:
        p.error(f"--formats {args.formats!r}: choose from parquet, jsonl, csv")
    readers = [r for r in args.parquet_readers.split(",") if r]
    if not readers or set(readers) - {"tasks", "actors"}:
        p.error(f"--parquet-readers {args.parquet_readers!r}: choose from tasks, actors")

    import ray
    ray.init(include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    work = Path(args.work)
    shuffles = args.shuffles.split(",")
    # (format, shuffle, Parquet reader)
    variants = [("parquet", s, readers[0]) for s in shuffles] + [
        (f, shuffles[0], readers[0]) for f in args.formats.split(",") if f and f != "parquet"] + [
        ("parquet", shuffles[0], r) for r in readers[1:]]
    warm, _ = make_log(5000, work)  # start workers before anything is timed
    run_once(warm, work / "run-warmup", shuffles[0])

    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        log, rows = make_log(size, work)
        runs = {v: [] for v in variants}
        for rep in range(args.repeats):
            for fmt, shuffle, reader in variants:  # interleaved, so machine noise hits every variant alike
                r = run_once(log, work / f"run-{size}-{fmt}-{shuffle}-{reader}", shuffle, fmt, reader)
                runs[(fmt, shuffle, reader)].append(r)
                print(f"rows={rows} format={fmt} shuffle={shuffle} parquet_reader={reader} rep={rep}: {r['wall_s']:.1f}s")
        for (fmt, shuffle, reader), rs in runs.items():
            if rs[0]["counts"] != runs[variants[0]][0]["counts"]:
                raise SystemExit(f"{fmt}/{shuffle}/{reader} counted {rs[0]['counts']}, "
                                 f"parquet {runs[variants[0]][0]['counts']}")
            walls = [r["wall_s"] for r in rs]
            med = statistics.median(walls)
            results.append({"target_rows": size, "interactions": rows, "format": fmt, "shuffle": shuffle,
                            "parquet_reader": reader, "wall_s": walls, "median_s": round(med, 2),
                            "rows_per_s": round(rows / med), "counts": rs[0]["counts"], "examples": rs[0]["examples"]})
    million = [r for r in results if r["target_rows"] == 1_000_000 and r["shuffle"] == "sort_shuffle_pull_based"
               and r["format"] == "parquet" and r["parquet_reader"] == "tasks"]
    report = {
        "benchmark": "prepare", "machine": {"cpus": os.cpu_count(), "python": stdlib_platform.python_version(),
                                            "ray": ray.__version__},
        "repeats": args.repeats, "results": results,
        "target": {"rows": 1_000_000, "max_s": 180,
                   "met": bool(million and million[0]["median_s"] < 180) if million else None},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    plot(results, Path(args.out).with_suffix(".png"))
    print(json.dumps({_name(r): r["median_s"] for r in results}, indent=2))


def _name(r: dict) -> str:
    return f"{r['interactions']}/{r.get('format', 'parquet')}/{r['shuffle']}/{r.get('parquet_reader', 'tasks')}"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    def variant_of(r: dict) -> tuple:
        return r.get("format", "parquet"), r["shuffle"], r.get("parquet_reader", "tasks") + " reader"

    for variant in sorted({variant_of(r) for r in results}):
        rs = sorted((r for r in results if variant_of(r) == variant),
                    key=lambda r: r["interactions"])
        ax.plot([r["interactions"] for r in rs], [r["median_s"] for r in rs], marker="o", label=" / ".join(variant))
    ax.axhline(180, color="grey", linestyle="--", label="target: 1M in 180 s")
    ax.set_xscale("log")
    ax.set_xlabel("interactions")
    ax.set_ylabel("prepare wall time, median (s)")
    ax.set_title("prepare stage on 2 cores")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
