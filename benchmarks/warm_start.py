"""Incremental re-distillation on the demo shop: warm start against a run from scratch.

    python benchmarks/warm_start.py [--work runs/bench-warm] [--fraction 0.85] [key=value ...]

The generated demo shop (configs/demo.yaml) is cut by time: window 1 holds the clicks and reviews
before the `fraction` quantile of the timestamps, window 2 all of them (the same catalogue). Then:

  1. the pipeline (no tune) over window 1, which leaves a bundle;
  2. window 2, warm-started from that bundle (`--warm-start`): teacher reused, cached labels reused;
  3. window 2 from scratch (a new teacher, every example labelled), for comparison.

Runs 2 and 3 go one after the other on the same machine. Writes
benchmarks/results/warm_start.json (stage wall times, labels reused and labelled, test metrics of
the earlier student, the warm-started one, the one from scratch and the teachers on window 2) and
warm_start.png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform as stdlib_platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

import numpy as np  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
from distillery import runner, storage  # noqa: E402
from distillery.config import load_config  # noqa: E402
from distillery.data import synthetic  # noqa: E402
from distillery.layout import RunLayout  # noqa: E402
from distillery.tasks import SCORE_METRIC  # noqa: E402
from distillery.stages.prepare import write_tables  # noqa: E402

STAGES = ["prepare", "teacher", "label", "distill", "compress", "report"]


def windows(cfg, work: Path, fraction: float) -> dict[str, Path]:
    """Window 1 (clicks and reviews before the cut) and window 2 (all), same catalogue."""
    tables = synthetic.generate(cfg.data.synthetic)
    cut = float(np.quantile(tables["interactions"].column("timestamp").to_numpy(), fraction))
    early = {n: t.filter(pc.less(t.column("timestamp"), cut)) if n != "items" else t for n, t in tables.items()}
    write_tables(early, str(work / "data-w1"))
    write_tables(tables, str(work / "data-w2"))
    return {"w1": work / "data-w1", "w2": work / "data-w2", "cut": cut,
            "rows": {"w1": early["interactions"].num_rows, "w2": tables["interactions"].num_rows}}


def summary(run_dir: Path) -> dict:
    layout = RunLayout(str(run_dir))
    out = {"wall_s": {s: storage.read_json(layout.manifest(s))["wall_time_s"] for s in STAGES
                      if storage.exists(layout.manifest(s))}}
    lm = storage.read_json(layout.label.manifest)
    out["labels"] = {"total": lm["counts"]["labels"], "labelled": lm["counts"]["labelled"],
                     "reused": lm["counts"]["reused"], "labelled_by_task": lm["labelled"], "reused_by_task": lm["reused"]}
    teacher, bundle = storage.read_json(layout.teacher.metrics), storage.read_json(layout.compress.metrics)
    out["test"] = {"teacher": teacher["test"], "bundle": bundle["test"],
                   **{v: storage.read_json(layout.distill.variant(v).metrics)["test"] for v in ("student", "student_no_kd")}}
    if storage.exists(layout.distill.warm_start):
        out["test"]["previous_bundle"] = storage.read_json(layout.distill.warm_start)["previous"]["test"]
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    warm, cold = result["runs"]["warm"], result["runs"]["scratch"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(STAGES))
    a.bar(x - 0.2, [cold["wall_s"].get(s, 0) for s in STAGES], 0.4, label="from scratch")
    a.bar(x + 0.2, [warm["wall_s"].get(s, 0) for s in STAGES], 0.4, label="warm start")
    a.set_xticks(x, STAGES, rotation=30)
    a.set_ylabel("wall time, s")
    a.set_title("window 2: stage times")
    a.legend()
    tasks = [t for t in SCORE_METRIC if t in warm["test"]["bundle"]]
    x = np.arange(len(tasks))
    for i, (name, run, m) in enumerate([("earlier bundle", warm, "previous_bundle"), ("warm start", warm, "bundle"),
                                        ("from scratch", cold, "bundle"), ("teacher (scratch)", cold, "teacher")]):
        b.bar(x + (i - 1.5) * 0.2, [run["test"][m][t][SCORE_METRIC[t]] for t in tasks], 0.2, label=name)
    b.set_xticks(x, [f"{t}\n{SCORE_METRIC[t]}" for t in tasks])
    b.set_title("window 2: test metrics (bundles)")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"), help="run config (synthetic data)")
    p.add_argument("--work", default=str(ROOT / "runs" / "bench-warm"), help="folder for the data and the three runs")
    p.add_argument("--fraction", type=float, default=0.85, help="share of the time range in window 1 (default 0.85)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "warm_start.json"), help="results JSON")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (all three runs)")
    args = p.parse_args()
    work = Path(args.work).resolve()
    base = load_config(args.config, args.overrides)
    w = windows(base, work, args.fraction)

    def cfg(window: str, run: str, *extra: str):
        d = w[window]
        return load_config(args.config, [*args.overrides, "data.format=native", f"data.items={d / 'items.parquet'}",
                                         f"data.interactions={d / 'interactions.parquet'}",
                                         f"data.reviews={d / 'reviews.parquet'}", f"run_dir={work / run}", *extra])

    runner.init_ray()
    t0 = time.perf_counter()
    runner.run(cfg("w1", "w1"), STAGES)
    runner.run(cfg("w2", "w2-warm", f"warm_start={work / 'w1' / 'bundle'}"), STAGES)
    runner.run(cfg("w2", "w2-scratch"), STAGES)
    result = {
        "what": "window 1 = clicks before the time cut, window 2 = all clicks, same catalogue; window 2 run "
                "warm-started from window 1's bundle and from scratch, one after the other",
        "config": str(Path(args.config).relative_to(ROOT)) if Path(args.config).resolve().is_relative_to(ROOT) else args.config,
        "overrides": args.overrides, "fraction": args.fraction, "interactions": w["rows"],
        "runs": {"w1": summary(work / "w1"), "warm": summary(work / "w2-warm"), "scratch": summary(work / "w2-scratch")},
        "machine": {"cpus": os.cpu_count(), "python": stdlib_platform.python_version()},
        "total_s": round(time.perf_counter() - t0, 1),
    }
    warm, cold = result["runs"]["warm"], result["runs"]["scratch"]
    result["ratios"] = {
        "labels_reused_share": round(warm["labels"]["reused"] / warm["labels"]["total"], 4),
        "pipeline_speedup": round(sum(cold["wall_s"].values()) / sum(warm["wall_s"].values()), 2),
        "teacher_plus_label_speedup": round((cold["wall_s"]["teacher"] + cold["wall_s"]["label"])
                                            / (warm["wall_s"]["teacher"] + warm["wall_s"]["label"]), 2),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))
    print(json.dumps({"labels": warm["labels"], "ratios": result["ratios"]}, indent=1))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
