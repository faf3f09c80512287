"""Distillation quality on real data: the KD student and the no-KD student over several seeds.

    python benchmarks/quality.py [--data DIR] [--seeds 0,1,2] [--work runs/office]

Runs prepare, teacher and label once on the Amazon 2014 Office data (`configs/amazon.yaml`, the
`amazon14_office_products_lcrec` folder of ../shared/data or $DISTILLERY_SHARED_DATA), then the
distill stage once per seed (the seed changes the students' initialization and batches, not the
teacher or the labels), and evaluates every student on the test split.
Writes benchmarks/results/quality_office.json (per seed, means and standard deviations, the
issue's targets checked) and quality_office.png.

Targets (issue 4), on the mean over seeds:
  student / teacher >= 0.97 on intent macro-F1 and on CTR AUC;
  student NDCG@10 >= teacher NDCG@10;
  KD student > no-KD student on every task by more than one standard deviation.
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

from distillery import distill, runner, storage  # noqa: E402
from distillery.config import load_config  # noqa: E402
from distillery.teacher import SCORE_METRIC  # noqa: E402


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "runs": values}


def main() -> int:
    default_data = Path(os.environ.get("DISTILLERY_SHARED_DATA", ROOT.parent / "shared" / "data"))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(default_data / "amazon14_office_products_lcrec"),
                   help="folder with interactions.parquet and items.parquet (LC-Rec Office in the native contract)")
    p.add_argument("--config", default=str(ROOT / "configs" / "amazon.yaml"), help="run config")
    p.add_argument("--seeds", default="0,1,2", help="student seeds, comma-separated")
    p.add_argument("--work", default=str(ROOT / "runs" / "office"), help="run directory (teacher and labels are reused)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality_office.json"), help="results JSON")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = p.parse_args()
    data = Path(args.data)
    if not (data / "interactions.parquet").exists():
        print(f"no Office data at {data}: pass --data or set DISTILLERY_SHARED_DATA")
        return 2
    cfg = load_config(args.config, [f"data.interactions={data / 'interactions.parquet'}",
                                     f"data.items={data / 'items.parquet'}", f"run_dir={args.work}", *args.overrides])
    runner.init_ray()
    t0 = time.perf_counter()
    runner.run(cfg, ["prepare", "teacher", "label"])
    upstream_s = time.perf_counter() - t0
    teacher = storage.read_json(storage.join(cfg.run_dir, "teacher", "metrics.json"))
    seeds = [int(s) for s in args.seeds.split(",")]
    per_seed = {}
    for seed in seeds:
        out = storage.join(cfg.run_dir, f"distill-seed{seed}")  # variants finished earlier are kept
        s_cfg = cfg.model_copy(update={"seed": seed, "run_dir": storage.absolute(cfg.run_dir)})
        t1 = time.perf_counter()
        summary = distill.run(s_cfg, out)
        per_seed[seed] = {v: {"test": summary[v]["test"], "valid_score": summary[v]["valid_score"],
                              "best_epoch": summary[v]["best_epoch"]} for v in distill.VARIANTS}
        per_seed[seed]["seconds"] = round(time.perf_counter() - t1, 1)

    tasks = [t for t in SCORE_METRIC if t in teacher["test"]]
    result = {"data": str(data), "seeds": seeds, "teacher": {t: teacher["test"][t] for t in tasks},
              "baselines": {t: teacher["baselines"].get(t, {}) for t in tasks}, "per_seed": per_seed,
              "summary": {}, "targets": {}, "upstream_seconds": round(upstream_s, 1),
              "machine": {"cpus": os.cpu_count(), "platform": stdlib_platform.platform()}}
    for t in tasks:
        m = SCORE_METRIC[t]
        stats = {v: _stats([per_seed[s][v]["test"][t][m] for s in seeds]) for v in distill.VARIANTS}
        result["summary"][t] = {"metric": m, "teacher": teacher["test"][t][m], **stats,
                                "student_over_teacher": stats["student"]["mean"] / teacher["test"][t][m]}
    s = result["summary"]
    result["targets"] = {
        "intent_ratio_ge_0.97": s.get("intent", {}).get("student_over_teacher", 0) >= 0.97,
        "ctr_auc_ratio_ge_0.97": s.get("ctr", {}).get("student_over_teacher", 0) >= 0.97,
        "ndcg_ge_teacher": s.get("recommendation", {}).get("student_over_teacher", 0) >= 1.0,
        **{f"kd_beats_no_kd_{t}": s[t]["student"]["mean"] - s[t]["student_no_kd"]["mean"]
           > max(s[t]["student"]["std"], s[t]["student_no_kd"]["std"]) for t in tasks},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    plot(result, Path(args.out).with_suffix(".png"))
    for t, row in s.items():
        print(f"{t:<15} {row['metric']:<9} teacher={row['teacher']:.4f}  "
              f"student={row['student']['mean']:.4f}±{row['student']['std']:.4f}  "
              f"no-KD={row['student_no_kd']['mean']:.4f}±{row['student_no_kd']['std']:.4f}  "
              f"student/teacher={row['student_over_teacher']:.3f}")
    print("targets:", json.dumps(result["targets"]))
    print(f"wrote {args.out}")
    return 0


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["summary"]
    fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 3.6), squeeze=False)
    for ax, (t, row) in zip(axes[0], rows.items()):
        names = ["teacher", "student", "student_no_kd"]
        means = [row["teacher"], row["student"]["mean"], row["student_no_kd"]["mean"]]
        errs = [0, row["student"]["std"], row["student_no_kd"]["std"]]
        base = next(iter(result["baselines"].get(t, {}).items()), None)
        if base:
            names.append(base[0])
            means.append(base[1][row["metric"]])
            errs.append(0)
        ax.bar(range(len(means)), means, yerr=errs, capsize=4, color=["C0", "C1", "C2", "0.6"][:len(means)])
        ax.set_xticks(range(len(means)), names, rotation=20, ha="right", fontsize=8)
        ax.set_title(f"{t}: {row['metric']} (test, {len(result['seeds'])} seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
