"""Distillation quality on real data: teacher, KD student, no-KD student and every baseline, several seeds.

    python benchmarks/quality.py [--data DIR] [--seeds 0,1,2] [--work runs/office] [--reuse FILE] [key=value ...]

Runs `prepare` once on the Amazon 2014 Office data (`configs/amazon.yaml`, the
`amazon14_office_products_lcrec` folder of ../shared/data or $DISTILLERY_SHARED_DATA), then, per
seed, the whole rest of the pipeline that quality depends on, in its own run directory
(WORK/seed<S>): `teacher` (the sequence teacher, the SASRec baseline grid and the intent encoder),
`label`, `distill` (KD student and no-KD student) and `report` (sizes and CPU latency). The data
and its splits are the same for every seed; the seed changes every model's initialization, batch
order and dropout. Finished stages are kept, so an interrupted benchmark resumes. A seed whose
numbers an earlier results file already holds (`--reuse`) is taken from it and not run again, when
it was made with the same recipe (`recipe_hash`: the data, tasks, teacher, label, student and
distill settings): the seeds of a benchmark that outlasts one machine add up.

Writes benchmarks/results/quality_office.json: per seed, and for every model the mean, standard
deviation and runs over seeds (`summary.<task>.<model>` = {mean, std, runs}), the issue's targets
checked (`targets`), and quality_office.png. Per seed, `student_over_teacher_interval` is the
report's paired bootstrap interval of the KD student / teacher ratio on that seed's test split:
what the split's size alone leaves uncertain, which more seeds do not shrink (the split is shared).

The same benchmark runs review sentiment on the Amazon 2018 Magazine reviews:

    python benchmarks/quality.py --data ../shared/data/amazon18_magazine_subscriptions \
        --config configs/magazine.yaml --work runs/magazine --out benchmarks/results/quality_magazine.json

Targets, test split, means over seeds (each where its task runs):
  teacher NDCG@10 >= 1.15 x the converged SASRec baseline, and above 0.0635;
  teacher CTR AUC above every baseline; teacher intent and sentiment macro-F1 >= TF-IDF + 0.02;
  KD student >= 0.97 x teacher on every task's score metric;
  KD student above the no-KD student by more than one standard deviation on every task, and above
  the SASRec baseline on NDCG@10;
  the student >= 10x smaller and >= 20x faster at batch 1 than the teacher (report.json).
"""
from __future__ import annotations

import json
import os
import platform as stdlib_platform
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

import office  # noqa: E402  (benchmarks/office.py)
from distillery import runner, storage  # noqa: E402
from distillery.config import RunConfig, stable_hash  # noqa: E402
from distillery.layout import RunLayout  # noqa: E402
from distillery.tasks import SCORE_METRIC  # noqa: E402

MODELS = ("teacher", "student", "student_no_kd")
SASREC_PUBLISHED = 0.0635  # NDCG@10 of a widely used library's SASRec on this protocol (the floor)


RECIPE = ("data", "tasks", "teacher", "label", "student", "distill")


def recipe_hash(cfg: RunConfig) -> str:
    """What a seed's models depend on: the config's RECIPE sections. Not the seed or run directory,
    and not the settings of stages that do not change them (tune, compress, report)."""
    raw = cfg.model_dump(mode="json")
    return stable_hash({k: raw[k] for k in RECIPE})


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "runs": values}


def run_seed(cfg, work: Path, seed: int) -> dict:
    """Teacher, label, distill and report for one seed over the shared prepare output; its numbers."""
    run_dir = work / f"seed{seed}"
    layout = RunLayout(str(run_dir))
    if not storage.exists(layout.prepare.manifest):
        shutil.rmtree(layout.prepare.root, ignore_errors=True)
        shutil.copytree(RunLayout(str(work / "data")).prepare.root, layout.prepare.root)
    s_cfg = cfg.model_copy(update={"seed": seed, "run_dir": str(run_dir)})
    t0 = time.perf_counter()
    manifests = runner.run(s_cfg, ["teacher", "label", "distill", "report"])
    teacher = storage.read_json(layout.teacher.metrics)
    report = storage.read_json(storage.join(layout.report, "report.json"))
    out = {"recipe": recipe_hash(s_cfg), "test": {"teacher": teacher["test"]}, "baselines": teacher["baselines"],
           "sasrec_chosen": teacher.get("sasrec_chosen"), "sasrec_grid": teacher.get("sasrec_grid"),
           "teacher_members_test": teacher.get("members_test"),
           "stage_seconds": {k: m.get("wall_time_s") for k, m in manifests.items()},
           "seconds": round(time.perf_counter() - t0, 1)}
    for v in ("student", "student_no_kd"):
        m = storage.read_json(layout.distill.variant(v).metrics)
        out["test"][v] = m["test"]
        out[f"{v}_best_epoch"] = m["best_epoch"]
    if "relative_to_teacher" in report:  # the KD student over the teacher, with the test split's 95% interval
        out["student_over_teacher_interval"] = report["relative_to_teacher"]["student"]
    t, s = report["models"]["teacher"], report["models"]["student"]
    out["size_speed"] = {"teacher_params": t["params"], "student_params": s["params"],
                         "params_ratio": t["params"] / s["params"],
                         "teacher_p50_ms": t["cpu_latency_ms"]["p50"], "student_p50_ms": s["cpu_latency_ms"]["p50"],
                         "p50_ratio": t["cpu_latency_ms"]["p50"] / s["cpu_latency_ms"]["p50"]}
    return out


def summarize(per_seed: dict, tasks: list[str]) -> tuple[dict, dict]:
    seeds = list(per_seed)
    summary = {}
    for t in tasks:
        m = SCORE_METRIC[t]
        row = {"metric": m}
        for model in MODELS:
            row[model] = _stats([per_seed[s]["test"][model][t][m] for s in seeds])
        for name in per_seed[seeds[0]]["baselines"].get(t, {}):
            row[name] = _stats([per_seed[s]["baselines"][t][name][m] for s in seeds])
        row["student_over_teacher"] = row["student"]["mean"] / row["teacher"]["mean"]
        summary[t] = row
    size = {k: statistics.median([per_seed[s]["size_speed"][k] for s in seeds])
            for k in ("params_ratio", "p50_ratio")}
    ensemble = {}
    if all(per_seed[s].get("teacher_members_test") for s in seeds):  # what the ensemble buys
        for t in [t for t in tasks if t in per_seed[seeds[0]]["teacher_members_test"][0]]:
            m = SCORE_METRIC[t]
            ensemble[t] = {"members": len(per_seed[seeds[0]]["teacher_members_test"]),
                           "single_member": _stats([statistics.fmean(x[t][m] for x in per_seed[s]["teacher_members_test"])
                                                    for s in seeds]),
                           "ensemble": summary[t]["teacher"]}

    def mean(t, model):
        return summary[t][model]["mean"]

    targets = {}
    if "sasrec" in summary.get("recommendation", {}):  # the baseline can be switched off (teacher.sasrec.enabled)
        targets["teacher_ndcg_ge_1.15x_sasrec"] = mean("recommendation", "teacher") >= 1.15 * mean("recommendation", "sasrec")
        targets["teacher_ndcg_above_0.0635"] = mean("recommendation", "teacher") > SASREC_PUBLISHED
        targets["sasrec_ndcg_reaches_0.0635"] = mean("recommendation", "sasrec") >= SASREC_PUBLISHED
        targets["student_ndcg_above_sasrec"] = mean("recommendation", "student") > mean("recommendation", "sasrec")
    if "ctr" in summary:
        targets["teacher_auc_above_every_baseline"] = all(
            mean("ctr", "teacher") > summary["ctr"][b]["mean"] for b in summary["ctr"] if b not in (*MODELS, "metric", "student_over_teacher"))
    if "intent" in summary:
        targets["teacher_f1_ge_tfidf_plus_0.02"] = mean("intent", "teacher") >= mean("intent", "tfidf_logreg") + 0.02
    if "sentiment" in summary:
        targets["teacher_sentiment_f1_ge_tfidf_plus_0.02"] = (mean("sentiment", "teacher")
                                                              >= mean("sentiment", "tfidf_logreg") + 0.02)
    for t in summary:
        targets[f"student_ge_0.97_teacher_{t}"] = summary[t]["student_over_teacher"] >= 0.97
        gap = mean(t, "student") - mean(t, "student_no_kd")
        # one seed has no spread: the check is left open (null) rather than passed on a zero std
        targets[f"kd_beats_no_kd_by_1std_{t}"] = (gap > max(summary[t]["student"]["std"], summary[t]["student_no_kd"]["std"])
                                                  if len(seeds) > 1 else None)
    targets["student_10x_fewer_params"] = size["params_ratio"] >= 10
    targets["student_20x_lower_p50_latency"] = size["p50_ratio"] >= 20
    return summary, {"targets": targets, "size_speed_median": size, "teacher_ensemble": ensemble}


def main() -> int:
    p = office.parser(__doc__, work=str(ROOT / "runs" / "office"),
                      work_help="folder of the run directories (kept: finished stages are reused when the "
                                "benchmark is run again)", out="quality_office.json")
    p.add_argument("--seeds", default="0,1,2", help="model seeds, comma-separated")
    p.add_argument("--reuse", default=None, help="an earlier results JSON of this benchmark: its seeds are taken "
                   "from it instead of being run (each must have been made with this run's recipe: the same "
                   "data, tasks, teacher, label, student and distill settings)")
    args = p.parse_args()
    work = Path(args.work).resolve()
    cfg = office.config(args, work / "data")
    if cfg is None:
        return 2
    reused = reusable_seeds(args, recipe_hash(cfg))
    if reused is None:
        return 2
    runner.init_ray()
    t0 = time.perf_counter()
    runner.run(cfg, ["prepare"])
    seeds = [int(s) for s in args.seeds.split(",")]
    per_seed = {}
    for seed in seeds:  # the file is rewritten after every seed: a long benchmark cut short still reports
        per_seed[seed] = reused[seed] if seed in reused else run_seed(cfg, work, seed)
        tasks = [t for t in SCORE_METRIC if t in per_seed[seeds[0]]["test"]["teacher"]]
        summary, checks = summarize(per_seed, tasks)
        result = {"data": args.data, "seeds": list(per_seed), "seeds_requested": seeds, "config": str(args.config),
                  "overrides": args.overrides,
                  "reused": {"file": args.reuse, "seeds": sorted(set(reused) & set(per_seed))} if args.reuse else None,
                  "summary": summary, **checks, "per_seed": per_seed,
                  "seconds": round(time.perf_counter() - t0, 1),
                  "machine": {"cpus": os.cpu_count(), "platform": stdlib_platform.platform()}}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        plot(result, Path(args.out).with_suffix(".png"))
        print(f"seed {seed} done; {len(per_seed)}/{len(seeds)} seeds in {args.out}", flush=True)
    for t, row in summary.items():
        cells = "  ".join(f"{k}={v['mean']:.4f}±{v['std']:.4f}" for k, v in row.items() if isinstance(v, dict))
        print(f"{t:<15} {row['metric']:<9} {cells}  student/teacher={row['student_over_teacher']:.3f}")
    print("targets:", json.dumps(checks["targets"], indent=1))
    print(f"wrote {args.out}")
    return 0


def reusable_seeds(args, recipe: str) -> dict[int, dict] | None:
    """{seed: its per-seed record} from `args.reuse`, or None (after saying why) when that file is
    not this benchmark's results or a seed in it was made with another recipe (`recipe_hash`)."""
    if not args.reuse:
        return {}
    try:
        old = json.loads(Path(args.reuse).read_text())
        records = {int(s): r for s, r in old["per_seed"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        print(f"--reuse {args.reuse}: not a results file of this benchmark ({exc!r}); run without --reuse")
        return None
    other = sorted(s for s, r in records.items() if r.get("recipe") != recipe)
    if other:
        print(f"--reuse {args.reuse}: seed(s) {', '.join(map(str, other))} were made with another recipe than "
              f"{args.config} {' '.join(args.overrides)} gives (its data, tasks, teacher, label, student or distill "
              "settings differ), so their numbers are not comparable. Run without --reuse")
        return None
    return records


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["summary"]
    fig, axes = plt.subplots(1, len(rows), figsize=(4.6 * len(rows), 3.8), squeeze=False)
    for ax, (t, row) in zip(axes[0], rows.items()):
        names = [k for k, v in row.items() if isinstance(v, dict)]
        means, errs = [row[n]["mean"] for n in names], [row[n]["std"] for n in names]
        colors = ["C0", "C1", "C2"] + ["0.55"] * (len(names) - 3)
        ax.bar(range(len(names)), means, yerr=errs, capsize=4, color=colors)
        for i, v in enumerate(means):
            ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
        ax.set_title(f"{t}: {row['metric']} (test, {len(result['seeds'])} seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
