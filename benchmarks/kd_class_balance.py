"""Class-balanced intent distillation on real data: the KD student at several `kd_class_power`s, side by side.

    python benchmarks/kd_class_balance.py --base runs/office/seed0 [--powers 0,0.5] [--seeds 0,1,2]
        [--work runs/kd_class_balance] [--out benchmarks/results/kd_class_balance_office.json] [key=value ...]

`--base` is a finished run directory with `prepare`, `teacher` and `label` done (a seed of
`benchmarks/quality.py`, or `distillery run configs/amazon.yaml --stages prepare,teacher,label`). Every
arm distills the KD student alone from that one teacher's labels, with the base run's config, the arm's
`tasks.intent.kd_class_power` and the arm's seed, in its own run directory under WORK (prepare,
teacher and label linked, not copied). The teacher is the same for every arm, so the spread is the
student's own (initialization, batch order, dropout). The base run's own KD student is reused for the
arm whose config equals the base run's (its power and seed, and overrides, if any, that repeat its
values) instead of being trained again.

Writes, after every arm: per arm and seed the best epoch's validation and the test metrics, the mean
and standard deviation over seeds per power, the paired test differences against the first power,
and a PNG beside the JSON.
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

from distillery import runner, storage  # noqa: E402
from distillery.config import RunConfig, load_config  # noqa: E402
from distillery.layout import RunLayout  # noqa: E402
from distillery.tasks import SCORE_METRIC  # noqa: E402


def arm_config(base: RunConfig, run_dir: Path, power: float, seed: int, overrides: list[str]) -> RunConfig:
    raw = base.model_dump(mode="json")
    raw["run_dir"], raw["seed"] = str(run_dir), seed
    raw["tasks"]["intent"]["kd_class_power"] = power
    path = run_dir / "config.json"
    path.write_text(json.dumps(raw))
    return load_config(path, overrides)


def same_student(arm: RunConfig, base: RunConfig) -> bool:
    """Whether the arm would train the base run's own KD student again: equal configs, run_dir aside
    (an override that repeats the base's value changes nothing)."""
    a, b = arm.model_dump(mode="json"), base.model_dump(mode="json")
    a.pop("run_dir"), b.pop("run_dir")
    return a == b


def link_inputs(base_dir: Path, run_dir: Path) -> None:
    """prepare, teacher and label of the base run, as symlinks in `run_dir`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for stage in ("prepare", "teacher", "label"):
        link = run_dir / stage
        if not link.exists():
            link.symlink_to(base_dir / stage, target_is_directory=True)


def train_arm(cfg: RunConfig) -> dict:
    """The KD student of `cfg` (distill stage's trainer, one student); its metrics.json."""
    import ray
    from distillery.stages import distill

    layout = RunLayout(cfg.run_dir)
    out = layout.distill.variant("student")
    if storage.exists(out.metrics):
        return storage.read_json(out.metrics)
    inp = distill.inputs(cfg)
    datasets = {t: ray.data.from_arrow(tb).materialize() for t, tb in inp.tables.items()}
    run = distill.StudentRun("student", out.root, f"student-p{cfg.tasks.intent.kd_class_power:g}-s{cfg.seed}")
    result = distill.trainer(inp, cfg, [run], datasets, run_name="distill",
                             storage_path=layout.distill.ray_train).fit()
    if result.error:
        raise result.error
    metrics = distill.finish(inp, out.root)
    storage.remove(layout.distill.ray_train)
    return metrics


def summarize(arms: list[dict], powers: list[float]) -> dict:
    """Per power and task: test and valid {mean, std, runs}; paired test differences to powers[0]."""
    out = {}
    for t, m in SCORE_METRIC.items():
        row = {}
        for p in powers:
            done = [a for a in arms if a["power"] == p and t in a["test"]]
            if done:
                row[f"{p:g}"] = {split: _stats([a[split][t][m] for a in done]) for split in ("test", "valid")}
        ref = {a["seed"]: a["test"][t][m] for a in arms if a["power"] == powers[0] and t in a["test"]}
        for p in powers[1:]:
            diffs = [a["test"][t][m] - ref[a["seed"]] for a in arms if a["power"] == p and a["seed"] in ref]
            if diffs:
                row[f"{p:g}"][f"test_minus_power_{powers[0]:g}"] = _stats(diffs)
        if row:
            out[t] = {"metric": m, **row}
    return out


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "runs": values}


def plot(result: dict, path: Path) -> None:
    """Per task, each seed's validation and test value at every power, a line per seed (the arms are
    paired by seed), and the teacher's test value."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    powers, tasks = result["powers"], list(result["summary"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        m = result["summary"][t]["metric"]
        for split, style in (("valid", "--"), ("test", "-")):
            for seed in result["seeds"]:
                arms = sorted((a for a in result["arms"] if a["seed"] == seed and t in a[split]),
                              key=lambda a: a["power"])
                ax.plot([a["power"] for a in arms], [a[split][t][m] for a in arms], style, marker="o", ms=4,
                        color=f"C{result['seeds'].index(seed)}", label=f"seed {seed} {split}")
        ax.axhline(result["teacher_test"][t], color="0.3", ls=":", lw=1.2, label="teacher (test)")
        ax.set_xticks(powers, [f"{p:g}" for p in powers])
        ax.set_xlabel("tasks.intent.kd_class_power")
        ax.set_title(f"KD student, {t}: {m}", fontsize=9)
    axes[0][-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="a run directory whose prepare, teacher and label stages are done")
    p.add_argument("--powers", default="0,0.5", help="tasks.intent.kd_class_power values, comma-separated; the "
                   "first is the reference the paired differences are taken against")
    p.add_argument("--seeds", default="0,1,2", help="student seeds, comma-separated")
    p.add_argument("--work", default=str(ROOT / "runs" / "kd_class_balance"), help="folder of the arms' run "
                   "directories (kept: a finished arm is reused when the benchmark is run again)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kd_class_balance_office.json"),
                   help="results JSON (the PNG is written beside it)")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every arm's config")
    args = p.parse_args()
    base_dir = Path(args.base).resolve()
    base_layout = RunLayout(str(base_dir))
    missing = [s for s, f in (("teacher", base_layout.teacher.metrics), ("label", base_layout.label.manifest))
               if not storage.exists(f)]
    if missing or not (base_dir / "config.json").exists():
        print(f"{base_dir} is not a finished run directory (missing: {', '.join(missing) or 'config.json'}): run "
              f"benchmarks/quality.py or `distillery run configs/amazon.yaml --stages prepare,teacher,label` first")
        return 2
    raw = json.loads((base_dir / "config.json").read_text())
    # a base run of an earlier version may carry a section this one dropped (`serve`): not a student setting
    base = RunConfig.model_validate({k: v for k, v in raw.items() if k in RunConfig.model_fields})
    powers = [float(x) for x in args.powers.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    work = Path(args.work).resolve()
    teacher = storage.read_json(base_layout.teacher.metrics)
    runner.init_ray()
    t0, arms = time.perf_counter(), []
    for seed in seeds:  # seed-major: a benchmark cut short still has whole pairs
        for power in powers:
            run_dir = work / f"power{power:g}-seed{seed}"
            link_inputs(base_dir, run_dir)
            cfg = arm_config(base, run_dir, power, seed, args.overrides)
            reuse = same_student(cfg, base) and storage.exists(base_layout.distill.variant("student").metrics)
            if reuse:
                metrics, seconds = storage.read_json(base_layout.distill.variant("student").metrics), None
            else:
                started = time.perf_counter()
                metrics = train_arm(cfg)
                seconds = round(time.perf_counter() - started, 1)
            arms.append({"power": power, "seed": seed, "from_base_run": reuse, "seconds": seconds,
                         "best_epoch": metrics["best_epoch"], "valid": metrics["valid"], "test": metrics["test"]})
            print(f"power {power:g} seed {seed}: " + "  ".join(
                f"{t} valid {metrics['valid'][t][m]:.4f} test {metrics['test'][t][m]:.4f}"
                for t, m in SCORE_METRIC.items() if t in metrics["test"]), flush=True)
            result = {"base": str(base_dir), "powers": powers, "seeds": seeds, "overrides": args.overrides,
                      "teacher_test": {t: teacher["test"][t][m] for t, m in SCORE_METRIC.items()
                                       if t in teacher["test"]},
                      "summary": summarize(arms, powers), "arms": arms, "seconds": round(time.perf_counter() - t0, 1),
                      "machine": {"cpus": os.cpu_count(), "platform": stdlib_platform.platform()}}
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2))
            plot(result, Path(args.out).with_suffix(".png"))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
