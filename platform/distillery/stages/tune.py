"""The `tune` stage: a Ray Tune sweep over the distillation's per-task temperatures T_t, soft/hard
mixes a_t and loss weights w_t, the learning rate and optionally the student's width.

Each trial is a Tune function that builds and fits one distillation `TorchTrainer` (the Ray 2.60
pattern; `TuneReportCallback` passes each epoch's validation metrics on to Tune).

- Search: Optuna's TPE through `OptunaSearch` (`tune.search=optuna`). With ~11 continuous
  dimensions and 16 trials, TPE spends the trials after the first random ones near the regions
  that scored well, where random or grid search keeps spreading them (not measured against random
  here). BOHB would need hpbandster and ConfigSpace, and HyperOpt is TPE too but less maintained.
- Early stopping: ASHA on the validation combined score (mean student/teacher ratio of NDCG@10,
  AUC and macro-F1), one rung per `grace_period` * reduction_factor^k epochs.
- The first trial runs the config's own values (clamped into the space), so the best trial is
  compared with the defaults at the same budget (best.json, trials.csv column `defaults`).
- The winner is the best trial's own saved model (its best epoch), not a retrain: ASHA lets the
  best trials run the whole per-trial budget, and with `tune.epochs` left at the distill stage's
  that is the distill stage's budget and seed, so retraining its config would repeat the same run
  at the cost of one more. It wins only if it beats the distill stage's student on validation;
  otherwise that student stays the one `compress` takes (best.json `winner`).
- Resume: the experiment has a stable name under RUN_DIR/tune/ray_tune; re-running the stage after
  an interruption restores it (`Tuner.restore`) and unfinished trials resume from their last
  Train checkpoint. A trial that crashes is recorded as failed and the sweep goes on.

Outputs in RUN_DIR/tune/: trials.csv (one row per trial), best.json (the winning config against
the defaults), tune.png (score against T_t and a_t per task), best/ (the winner: model/,
metrics.json, history.json) and trials/<id>/ (each trial's model and history).
"""
from __future__ import annotations

import csv
import dataclasses
import os
import re
import tempfile

from .. import storage
from ..config import TUNED_PER_TASK, RunConfig, TuneSpace, with_trial
from ..errors import StageError
from ..layout import RunLayout, TuneDir
from ..progress import say
from ..tasks import SCORE_METRIC, TASKS
from . import distill

EXPERIMENT = "sweep"


def param_space(space: TuneSpace, tasks: list[str]) -> dict:
    """The Tune search space: {"temperature": {task: domain}, ..., "lr": domain, "dim": domain}."""
    from ray import tune

    def domain(r):
        return tune.loguniform(r.low, r.high) if r.log else tune.uniform(r.low, r.high)

    out = {}
    for name in TUNED_PER_TASK:
        r = getattr(space, name)
        if r is not None:
            out[name] = {t: domain(r) for t in tasks}
    if space.lr is not None:
        out["lr"] = domain(space.lr)
    for t in tasks:  # the knobs of one task (`Task.tuned`), searched while it is in the run
        for name in TASKS[t].tuned:
            if (r := getattr(space, name)) is not None:
                out[name] = domain(r)
    if space.dim is not None:
        out["dim"] = tune.choice(list(space.dim))
    if not out:
        raise StageError("tune.space searches nothing: set at least one of temperature, alpha, weight, lr, "
                         "rank_weight, kd_class_power, dim")
    return out


def defaults_point(cfg: RunConfig, space: TuneSpace, tasks: list[str]) -> dict:
    """The run config's own values as a point of the search space (clamped into it): the sweep's
    first trial, so that the winner is compared with the defaults at the same budget."""
    def clamp(r, v):
        return min(max(v, r.low), r.high)

    point = {}
    for name in TUNED_PER_TASK:
        r = getattr(space, name)
        if r is not None:
            point[name] = {t: clamp(r, getattr(TASKS[t].settings(cfg), name)) for t in tasks}
    if space.lr is not None:
        point["lr"] = clamp(space.lr, cfg.distill.lr)
    for t in tasks:
        for name in TASKS[t].tuned:
            if (r := getattr(space, name)) is not None:
                point[name] = clamp(r, getattr(TASKS[t].settings(cfg), name))
    if space.dim is not None:
        point["dim"] = cfg.student.dim if cfg.student.dim in space.dim else space.dim[0]
    return point


def _trial(params: dict, *, inp: distill.Inputs, datasets: dict, out_root: str) -> None:
    """One Tune trial: a distillation TorchTrainer with this trial's config, on the datasets the
    driver materialized once for the whole sweep."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    cfg = with_trial(inp.cfg, params)
    spec = dataclasses.replace(inp.spec, dim=cfg.student.dim)
    out = TuneDir(out_root)
    # same name and storage when Tune restarts the trial: Train resumes from its last checkpoint
    run = distill.StudentRun("student", out.trial(trial_id).root, f"trial-{trial_id}")
    distill.trainer(inp, cfg, [run], datasets, run_name=run.name, spec=spec, storage_path=out.ray_train,
                    callbacks=(TuneReportCallback(),)).fit()


def _tuner(cfg: RunConfig, inp: distill.Inputs, out_dir: str):
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    epochs = cfg.tune.epochs or cfg.distill.epochs
    # materialized here, not in each trial: a trial's own Ray Data tasks could wait for CPUs that
    # the running trainers hold
    datasets = {t: ray.data.from_arrow(tb).materialize() for t, tb in inp.tables.items()}
    trainable = tune.with_resources(tune.with_parameters(_trial, inp=inp, datasets=datasets, out_root=out_dir),
                                    {"cpu": 0.01})  # the trial only drives its TorchTrainer's workers
    path = storage.join(TuneDir(out_dir).ray_tune, EXPERIMENT)
    if tune.Tuner.can_restore(path):
        say(f"[tune] resuming the interrupted sweep in {path}")
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False)
    point = defaults_point(cfg, cfg.tune.space, inp.tasks)
    if cfg.tune.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch
        from ray.tune.utils.util import flatten_dict

        search = OptunaSearch(metric="valid_score", mode="max", seed=cfg.seed,
                              points_to_evaluate=[flatten_dict(point, "/")])
    else:
        from ray.tune.search import BasicVariantGenerator

        search = BasicVariantGenerator(points_to_evaluate=[point], random_state=cfg.seed)
    return tune.Tuner(
        trainable,
        param_space=param_space(cfg.tune.space, inp.tasks),
        tune_config=tune.TuneConfig(
            metric="valid_score", mode="max", num_samples=cfg.tune.num_samples, search_alg=search,
            max_concurrent_trials=cfg.tune.max_concurrent_trials,
            scheduler=ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=min(cfg.tune.grace_period, epochs),
                                    reduction_factor=cfg.tune.reduction_factor)),
        run_config=tune.RunConfig(name=EXPERIMENT, storage_path=TuneDir(out_dir).ray_tune, verbose=1),
    )


def _rows(results, out_dir: str) -> list[dict]:
    rows = []
    for r in results:
        frame = r.metrics_dataframe
        trial_id = _rid(r)
        row = {"trial_id": trial_id, "defaults": _trial_dir_parts(r.path)[1] == 1}  # Tune counts from 1
        for name in TUNED_PER_TASK:
            for task, value in (r.config or {}).get(name, {}).items():
                row[f"{name}.{task}"] = value
        for key in ("lr", "rank_weight", "kd_class_power", "dim"):
            if key in (r.config or {}):
                row[key] = r.config[key]
        ran = 0 if frame is None or frame.empty else int(frame["epoch"].max())
        if frame is not None and not frame.empty and frame["valid_score"].notna().any():
            best = frame.loc[frame["valid_score"].idxmax()]
            row.update(score=float(best["valid_score"]), best_epoch=int(best["epoch"]),
                       **{f"valid.{t}_{m}": float(best[f"{t}_{m}"]) for t, m in SCORE_METRIC.items()
                          if f"{t}_{m}" in best})
        else:
            row.update(score=float("nan"), best_epoch=0)
        row["epochs_run"] = ran
        if r.error is not None:
            row["status"], row["error"] = "failed", _error_line(r.error)
        elif not storage.exists(TuneDir(out_dir).trial(trial_id).history):
            row["status"] = "stopped early"  # by ASHA: the trial's loop never reached its end
        else:
            row["status"] = "completed"  # all epochs, or fewer by its own patience (early stopping)
        rows.append(row)
    return sorted(rows, key=lambda x: -x["score"] if x["score"] == x["score"] else float("inf"))


def _write_csv(rows: list[dict], path: str) -> None:
    columns = ["trial_id", "defaults", "status", "score", "best_epoch", "epochs_run"]
    for row in rows:
        columns += [k for k in row if k not in columns and k != "error"]
    columns.append("error")
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "trials.csv")
        with open(local, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns, restval="")
            w.writeheader()
            w.writerows(rows)
        storage.upload_file(local, path)


def plot(rows: list[dict], tasks: list[str], path: str) -> None:
    """Score against T_t (log x) and a_t, one column per task; the best trial in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["score"] == r["score"]]
    fig, axes = plt.subplots(2, len(tasks), figsize=(4 * len(tasks), 6.5), squeeze=False)
    for j, task in enumerate(tasks):
        for i, (name, log) in enumerate((("temperature", True), ("alpha", False))):
            ax = axes[i][j]
            key = f"{name}.{task}"
            pts = [(r[key], r["score"], r["status"]) for r in done if key in r]
            for x, y, status in pts:
                ax.scatter(x, y, c="tab:blue" if status == "completed" else "tab:gray", s=25)
            if pts and done and key in done[0]:
                ax.scatter(done[0][key], done[0]["score"], c="tab:red", s=60, label="best")
                ax.legend(loc="lower right", fontsize=8)
            if log:
                ax.set_xscale("log")
            ax.set_xlabel(f"{'T' if name == 'temperature' else 'a'} ({task})")
            ax.set_ylabel("validation score (of the teacher)")
            ax.grid(alpha=0.3)
    fig.suptitle("Sweep: combined validation score per trial (grey: stopped early)")
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "tune.png")
        fig.savefig(local, dpi=110)
        storage.upload_file(local, path)
    plt.close(fig)


def run(cfg: RunConfig, out_dir: str) -> dict:
    default = RunLayout(cfg.run_dir).distill.variant("student").metrics
    out = TuneDir(out_dir)
    if not storage.exists(default):
        raise StageError(f"{default} is missing: run the distill stage first (--stages distill,tune)")
    if cfg.tune.space.dim and any(d % cfg.student.heads for d in cfg.tune.space.dim):
        raise StageError(f"tune.space.dim={cfg.tune.space.dim}: every width must be a multiple of "
                         f"student.heads={cfg.student.heads}")
    inp = distill.inputs(cfg)
    epochs = cfg.tune.epochs or cfg.distill.epochs
    say(f"[tune] {cfg.tune.num_samples} trials ({cfg.tune.search} search, ASHA from epoch "
        f"{min(cfg.tune.grace_period, epochs)} of {epochs}), {cfg.tune.max_concurrent_trials} at a time")
    results = _tuner(cfg, inp, out_dir).fit()
    rows = _rows(results, out_dir)
    _write_csv(rows, out.trials_csv)
    plot(rows, inp.tasks, out.plot)
    ok = [r for r in rows if r["score"] == r["score"] and
          storage.exists(storage.join(out.trial(r["trial_id"]).model, "model.safetensors"))]
    failed = sum(r["status"] == "failed" for r in rows)
    if not ok:
        raise StageError(f"no trial of the sweep finished an epoch ({failed} failed): see trials.csv and "
                         f"{out.ray_tune} for their errors")
    best = ok[0]
    best_dir = out.best
    _copy_dir(out.trial(best["trial_id"]).root, best_dir.root)
    params = next(r for r in results if _rid(r) == best["trial_id"]).config
    cfg_best = with_trial(cfg, params)
    spec = dataclasses.replace(inp.spec, dim=cfg_best.student.dim)
    if not storage.exists(best_dir.history):  # a stopped trial wrote none
        storage.write_json(best_dir.history, _history(results, best["trial_id"]))
    metrics = distill.finish(inp, best_dir.root, spec)
    default_score = storage.read_json(default)["valid_score"]
    same_budget = next((r for r in rows if r["defaults"] and r["score"] == r["score"]), None)
    summary = {"trial_id": best["trial_id"], "valid_score": best["score"],
               # the defaults as the sweep's first trial: same epochs per trial, same early stopping
               "defaults_trial_score": same_budget["score"] if same_budget else None,
               "gain_over_defaults_trial": best["score"] - same_budget["score"] if same_budget else None,
               "relative_gain_over_defaults_trial": best["score"] / same_budget["score"] - 1 if same_budget else None,
               # the distill stage's student (the defaults at its full budget)
               "distill_student_score": default_score,
               # a sweep whose best trial loses to it leaves the distill stage's student the winner
               "winner": "tune" if best["score"] > default_score else "distill",
               "params": params,
               "test": metrics["test"], "trials": len(rows), "failed": failed,
               "stopped_early": sum(r["status"] == "stopped early" for r in rows)}
    storage.write_json(out.summary, summary)
    storage.remove(out.ray_train)
    versus = (f"{same_budget['score']:.4f} for the defaults at the same budget "
              f"({summary['relative_gain_over_defaults_trial']:+.1%})" if same_budget else "no finished defaults trial")
    say(f"[tune] best trial {best['trial_id']}: validation score {best['score']:.4f} against {versus}, "
        f"{default_score:.4f} for the distill stage's student; {failed} failed, {summary['stopped_early']} "
        f"stopped early; the winner is the {'tuned' if summary['winner'] == 'tune' else 'distill stage'} student")
    return {"counts": {"trials": len(rows), "failed": failed}, "best": summary}


def _error_line(error: BaseException) -> str:
    """The exception line of a trial's error (Ray wraps it in the actor's traceback)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", x).strip() for x in str(error).splitlines()]
    lines = [x for x in lines if x]
    return (lines[-1] if lines else type(error).__name__)[:300]


def _trial_dir_parts(path: str) -> tuple[str, int]:
    """(trial id, trial number from 1) from a trial folder's name, `<trainable>_<id>_<n>_<params>_<date>`
    (the trainable's function name first); ids are 8 hex digits from a searcher, `<5 hex>_<5 digits>`
    from random sampling."""
    found = re.match(r".*?_([0-9a-f]{8}|[0-9a-f]{5}_\d{5})_(\d+)_", os.path.basename((path or "").rstrip("/")))
    return (found.group(1), int(found.group(2))) if found else ("unknown", -1)


def _rid(result) -> str:
    """A result's trial id: Tune puts it in every reported row; a trial that failed before its first
    report only has it in its folder's name."""
    if (result.metrics or {}).get("trial_id"):
        return result.metrics["trial_id"]
    return _trial_dir_parts(result.path)[0]


def _history(results, trial_id: str) -> list[dict]:
    """A history.json from Tune's record of a trial that was stopped before writing its own."""
    r = next(r for r in results if _rid(r) == trial_id)
    out = []
    for _, row in r.metrics_dataframe.iterrows():
        valid = {t: {m: float(row[f"{t}_{m}"])} for t, m in SCORE_METRIC.items() if f"{t}_{m}" in row}
        out.append({"epoch": int(row["epoch"]) - 1, "score": float(row["valid_score"]), "valid": valid, "loss": {}})
    return out


def _copy_dir(src: str, dst: str) -> None:
    storage.remove(dst)
    with storage.local_copy(src) as local:
        storage.upload_dir(local, dst)


__all__ = ["run", "param_space", "plot"]
