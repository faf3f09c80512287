"""Compression on real data: the compress stage on the Amazon 2014 Office data, every variant side by
side with the float32 student it came from and the teacher.

    python benchmarks/compress.py [--data DIR] [--work runs/office/seed0] [key=value ...]

Reuses WORK's prepare, teacher, label and distill stages (runs them when missing; the default is
the seed-0 run directory that `benchmarks/quality.py` leaves) and the tune stage's winner when WORK
has one, then runs the compress stage again (forced) and reads its `variants.json`: bytes,
parameters, batch-1 p50, batch-256 throughput (timed interleaved in one process) and the
validation and test change of every task, per variant. Writes benchmarks/results/compress_office.json
and compress_office.png.

Targets, test split, against the float32 student the bundle came from:
- the kept variant within 1% on every task;
- the bundle's weights >= 4x smaller than the float32 student's and >= 10x smaller than the teacher's;
- batch-1 p50 no slower and batch-256 throughput >= 1.3x;
- every variant strictly smaller or faster than its parent.
"""
from __future__ import annotations

import json
import os
import platform as stdlib_platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

import office  # noqa: E402  (benchmarks/office.py)
from distillery import runner, storage  # noqa: E402
from distillery.layout import RunLayout  # noqa: E402
from distillery.serving import bundle  # noqa: E402


def _file_bytes(path: Path) -> int:
    return path.stat().st_size


def targets(variants: list[dict], kept: str, teacher_bytes: int, bundle_bytes: int) -> dict:
    """The issue's targets, each a bool, from `variants.json` rows."""
    v = {r["name"]: r for r in variants}
    base, k = variants[0], v[kept]
    return {
        "kept_within_1pct_every_task_test": all(d <= 0.01 for d in k["test_drops"].values()),
        "bundle_4x_smaller_than_fp32": base["bytes"] / bundle_bytes >= 4,
        "bundle_10x_smaller_than_teacher": teacher_bytes / bundle_bytes >= 10,
        "b1_p50_no_slower": k["p50_ms"] <= base["p50_ms"],
        "b256_throughput_1.3x": k["throughput_b256"] / base["throughput_b256"] >= 1.3,
        "every_variant_smaller_or_faster_than_parent": all(r.get("smaller_or_faster", True) for r in variants),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = result["variants"]
    names = [r["name"] for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.8))
    ax[0].bar(x, [r["bytes"] / 1e6 for r in rows], color=["C1" if r["int8"] else "C0" for r in rows])
    ax[0].axhline(result["teacher_bytes"] / 1e6 / 10, color="k", ls=":", label="teacher / 10")
    ax[0].set_yscale("log")
    ax[0].set_ylabel("weights file (MB, log)")
    ax[0].set_title("size (orange: 8-bit)")
    ax[0].legend()
    ax[1].bar(x - 0.2, [r["throughput_b256"] / 1e3 for r in rows], 0.4, label="batch 256 (k req/s, left)")
    ax[1].set_ylabel("batch-256 throughput (k req/s)")
    p50 = ax[1].twinx()
    p50.bar(x + 0.2, [r["p50_ms"] for r in rows], 0.4, color="C2", label="batch-1 p50 (ms, right)")
    p50.set_ylabel("batch-1 p50 (ms)")
    ax[1].set_title("CPU speed, one thread, interleaved")
    ax[1].set_ylim(0, 1.3 * max(r["throughput_b256"] for r in rows) / 1e3)  # room for the legends
    p50.set_ylim(0, 1.3 * max(r["p50_ms"] for r in rows))
    ax[1].legend(loc="upper left", fontsize=8)
    p50.legend(loc="upper right", fontsize=8)
    tasks = list(rows[0]["test_drops"])
    for i, t in enumerate(tasks):
        ax[2].bar(x + (i - 1) * 0.27, [100 * -r["test_drops"][t] for r in rows], 0.27, label=t)
    ax[2].axhline(-100 * result["budget"], color="r", ls="--", label="budget")
    ax[2].set_ylabel("test change vs float32 student (%)")
    ax[2].set_title(f"quality (kept: {result['kept']})")
    ax[2].legend(fontsize=8)
    for a in ax:
        a.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    fig.suptitle(f"compress on Office: the {result['student_source']} stage's student")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = office.parser(__doc__, work=str(ROOT / "runs" / "office" / "seed0"),
                      work_help="run directory (upstream stages reused; default: quality.py's seed 0)",
                      out="compress_office.json")
    args = p.parse_args()
    cfg = office.config(args, args.work)
    if cfg is None:
        return 2
    cfg = cfg.model_copy(update={"run_dir": storage.absolute(cfg.run_dir)})
    runner.init_ray()
    runner.run(cfg, ["prepare", "teacher", "label", "distill"])
    t0 = time.perf_counter()
    m = runner.run(cfg, ["compress"], force=True)["compress"]
    seconds = time.perf_counter() - t0
    layout = RunLayout(cfg.run_dir)
    variants = storage.read_json(layout.compress.variants)
    metrics = storage.read_json(layout.compress.metrics)
    bundle.verify(layout.bundle)
    teacher_bytes = _file_bytes(Path(layout.teacher.model) / "model.safetensors")
    bundle_bytes = _file_bytes(Path(layout.bundle) / "model.safetensors")
    kept = m["chosen"]
    result = {
        "data": args.data, "student_source": metrics["source"], "seconds": round(seconds, 1),
        "kept": kept, "budget": cfg.compress.max_relative_drop, "task_budgets": cfg.compress.task_budgets,
        "teacher_bytes": teacher_bytes, "bundle_weights_bytes": bundle_bytes,
        "bundle_total_bytes": sum(f.stat().st_size for f in Path(layout.bundle).iterdir() if f.is_file()),
        "ratios": {"fp32_over_bundle": variants[0]["bytes"] / bundle_bytes,
                   "teacher_over_bundle": teacher_bytes / bundle_bytes},
        "variants": variants,
        "targets": targets(variants, kept, teacher_bytes, bundle_bytes),
        "machine": {"cpus": os.cpu_count(), "platform": stdlib_platform.platform()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    for r in variants:
        print(f"{r['name']:<26} {r['bytes']:>11,} B {r['params']:>10,} params  p50 {r['p50_ms']:.3f} ms  "
              f"b256 {r['throughput_b256']:>8,.0f}/s  test " +
              "  ".join(f"{t} {-100 * d:+.2f}%" for t, d in r["test_drops"].items()))
    print(json.dumps({"kept": kept, "ratios": result["ratios"], "targets": result["targets"]}, indent=1))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
