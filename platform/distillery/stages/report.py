"""The `report` stage: teacher, students and baselines side by side in RUN_DIR/report/
(report.json, report.md, PNG plots).

report.json (a contract; later stages add their models under "models" and "tasks"):
    {"dataset": {...counts...},
     "models": {name: {"params", "bytes", "cpu_latency_ms": {"p50", "p99"}, "cpu_latency_ms_by_task": {task: p50},
                       "cpu_throughput": {"batch1", "batch256"}}},
     "tasks": {task: {name: {metric: value}, "baselines": {baseline: {metric: value}}}},
     "relative_to_teacher": {name: {task: {"metric", "ratio", "low", "high", "level", "resamples", "units"}}},
     when those stages ran: "tune" (tune/summary.json), "compress" (compress/variants.json),
     "compressed": {"variant", "from"} (the kept compressed variant and the float32 student it was made from),
     "warm_start": {"bundle", "previous_run"}}

`relative_to_teacher`: each student's score metric over the teacher's on the test split, with a
paired bootstrap interval (`evaluation.ratio_intervals`): whether "keeps 95% of the teacher" is
told apart from 97% by a test split of this size.

Latency and throughput are measured by `latency.py`.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any

from .. import evaluation, latency, storage
from ..config import RunConfig
from ..data.examples import vocab_size
from ..errors import StageError
from ..layout import RunLayout, TeacherDir
from ..models import student as S
from ..models.teacher import load_model
from ..progress import say
from ..tasks import SCORE_METRIC, TASKS
from ..teaching.sequence import SequenceTasks

@dataclass(frozen=True)
class Reported:
    """A student the report measures: the loaded model, its tokenizer and spec, its metrics record
    (`test` per task) and the folder its weights file is in."""
    model: Any
    tokenizer: Any
    spec: Any
    metrics: dict
    folder: str


def _size(model_dir: str) -> int:
    fs, path = storage.resolve(storage.join(model_dir, "model.safetensors"))
    return fs.get_file_info(path).size


def run(cfg: RunConfig, out_dir: str) -> dict:
    layout = RunLayout(cfg.run_dir)
    prepare_dir = layout.prepare.root
    teacher_metrics = storage.read_json(layout.teacher.metrics)
    tasks = [t for t in cfg.tasks.enabled() if t in teacher_metrics["test"]]
    teacher_dir = layout.teacher.model
    teacher, t_tok, t_spec = load_model(teacher_dir)
    variants = {}
    for name in ("student", "student_no_kd"):
        d = layout.distill.variant(name)
        if not storage.exists(d.metrics):
            raise StageError(f"{d.metrics} is missing: run the distill stage first (--stages distill,report)")
        variants[name] = Reported(*S.load(d.model), storage.read_json(d.metrics), d.model)

    fresh = {s: layout.current(s) for s in ("tune", "compress")}  # made from this run's distill stage
    variants.update(_later_stages(layout, fresh))
    warm = layout.distill.warm_start
    warm_start = storage.read_json(warm) if storage.exists(warm) else None
    if warm_start:  # the student this run continued from, measured on this run's window
        from ..serving import bundle

        b = bundle.load(warm_start["bundle"])
        variants["student_previous"] = Reported(b.model, b.tokenizer, b.spec, warm_start["previous"], warm_start["bundle"])

    say(f"[report] timing teacher and students on one CPU thread ({cfg.report.latency_requests} requests each, interleaved)")
    requests = latency.requests(prepare_dir, tasks, cfg.report.latency_requests, cfg.seed)
    servers = {"teacher": latency.teacher_server(teacher, t_tok, t_spec.max_length, cfg.tasks.ctr.max_history),
               **{n: latency.student_server(v.model, v.tokenizer, v.spec) for n, v in variants.items()}}
    speed = latency.measure_latency(servers, requests)
    models = {"teacher": {"params": sum(p.numel() for p in teacher.parameters()), "bytes": _size(teacher_dir),
                          **speed["teacher"]}}
    for n, v in variants.items():
        models[n] = {"params": sum(p.numel() for p in v.model.parameters()), "bytes": _size(v.folder), **speed[n]}

    say(f"[report] each student against the teacher on the test split ({cfg.report.bootstrap} paired bootstrap resamples)")
    relative = relative_to_teacher(teacher, t_tok, t_spec, variants, prepare_dir,
                                   tasks, cfg.report.bootstrap, cfg.seed)
    task_report = {}
    for t in tasks:
        task_report[t] = {"teacher": teacher_metrics["test"][t],
                          **{n: v.metrics["test"][t] for n, v in variants.items()},
                          "baselines": teacher_metrics.get("baselines", {}).get(t, {})}
    prep = storage.read_json(layout.prepare.manifest)
    report = {"dataset": {**prep.get("counts", {}), "examples": prep.get("examples", {})},
              "models": models, "tasks": task_report, "relative_to_teacher": relative}
    if warm_start:
        report["warm_start"] = {"bundle": warm_start["bundle"], "previous_run": warm_start["previous_run"]}
    for stage, path in (("tune", layout.tune.summary), ("compress", layout.compress.variants)):
        if fresh[stage]:
            report[stage] = storage.read_json(path)
    kept = storage.read_json(layout.compress.metrics) if fresh["compress"] else None
    if kept and kept["variant"] != "student":  # compress starts from the tune stage's student only when it won
        report["compressed"] = {"variant": kept["variant"],
                                "from": "student_tuned" if kept["source"].startswith("tune") else "student"}
    trained = {n: layout.distill.variant(n).history for n in ("student", "student_no_kd")}
    histories = {n: _read_history(path) for n, path in {**trained, "student_tuned": layout.tune.best.history}.items()
                 if n in variants}
    with tempfile.TemporaryDirectory() as tmp:
        storage.write_json(os.path.join(tmp, "report.json"), report)
        plots = write_plots(report, histories, tmp)
        plots += teacher_plot(layout.teacher.root, tmp)
        with open(os.path.join(tmp, "report.md"), "w") as f:
            f.write(markdown(report, plots))
        storage.upload_dir(tmp, out_dir)
    print(summary_table(report))
    return {"models": {n: {"params": m["params"], "p50_ms": round(m["cpu_latency_ms"]["p50"], 3)}
                       for n, m in models.items()}, "plots": plots}


def relative_to_teacher(teacher, t_tok, t_spec, students: dict, prepare_dir: str, tasks: list[str],
                        resamples: int, seed: int) -> dict:
    """{student name: {task: ratio interval}} of each student (`Reported`) over the teacher, from
    both models' per-example outputs on the test split."""
    n_items = vocab_size(prepare_dir)
    ref = evaluation.outputs(evaluation.teacher_predictors(teacher, t_tok, tasks, t_spec.max_length), prepare_dir, "test",
                             n_items=n_items, max_history=teacher.max_history, seed=seed)
    out = {}
    for name, v in students.items():
        own = evaluation.outputs(evaluation.student_predictors(v.model, v.tokenizer, v.spec, tasks), prepare_dir, "test",
                                 n_items=v.spec.n_items, max_history=v.spec.history_window, seed=seed)
        out[name] = evaluation.ratio_intervals(own, ref, resamples=resamples, seed=seed)
    return out


def _later_stages(layout: RunLayout, fresh: dict[str, bool]) -> dict:
    """{name: `Reported`} of the tune stage's best trial
    ("student_tuned", whether or not it beat the distill stage's student) and the compress stage's
    kept variant (loaded from the verified bundle), when those stages ran on this run's distill
    stage (`fresh`, from `RunLayout.current`). The kept variant is left out when it is the uncompressed winner itself."""
    from ..serving import bundle

    out = {}
    best = layout.tune.best
    if fresh["tune"] and storage.exists(best.metrics):
        out["student_tuned"] = Reported(*S.load(best.model), storage.read_json(best.metrics), best.model)
    chosen = layout.compress.metrics
    if fresh["compress"]:
        metrics = storage.read_json(chosen)
        if metrics["variant"] != "student":
            b = bundle.load(layout.bundle)
            out[metrics["variant"]] = Reported(b.model, b.tokenizer, b.spec, metrics, layout.bundle)
    return out


def _read_history(path: str) -> list:
    return storage.read_json(path) if storage.exists(path) else []


# ------------------------------------------------------------------------------ rendering
def summary_table(report: dict) -> str:
    names = [n for n in report["models"]]
    w = {n: max(15, len(n) + 2) for n in names}
    lines = [f"{'':<26}" + "".join(f"{n:>{w[n]}}" for n in names) + "   baselines"]
    for t, m in SCORE_METRIC.items():
        if t in report["tasks"]:
            row = report["tasks"][t]
            bases = ", ".join(f"{b[m]:.4f} ({name})" for name, b in row["baselines"].items())
            lines.append(f"{t + ' ' + m:<26}" + "".join(f"{row[n][m]:>{w[n]}.4f}" for n in names) + "   " + bases)
    models = report["models"]
    lines.append(f"{'parameters':<26}" + "".join(f"{models[n]['params']:>{w[n]},}" for n in names))
    lines.append(f"{'weights file (MB)':<26}" + "".join(f"{models[n]['bytes'] / 1e6:>{w[n]}.2f}" for n in names))
    lines.append(f"{'latency p50 (ms, batch 1)':<26}" + "".join(f"{models[n]['cpu_latency_ms']['p50']:>{w[n]}.2f}" for n in names))
    lines.append(f"{'throughput (req/s, b256)':<26}" + "".join(f"{models[n]['cpu_throughput']['batch256']:>{w[n]},.0f}" for n in names))
    t = models["teacher"]
    s = models.get("student")
    if s:
        by_task = ", ".join(f"{k} {t['cpu_latency_ms_by_task'][k] / v:.1f}x" for k, v in s["cpu_latency_ms_by_task"].items())
        lines.append(f"student vs teacher: {t['params'] / s['params']:.1f}x fewer parameters, "
                     f"{t['cpu_latency_ms']['p50'] / s['cpu_latency_ms']['p50']:.1f}x lower p50 latency at batch 1 "
                     f"({by_task})")
    for n, by_task in report.get("relative_to_teacher", {}).items():
        if by_task:
            level = next(iter(by_task.values()))["level"]
            lines.append(f"{n} / teacher ({level:.0%} interval): " + ", ".join(
                f"{t} {r['ratio']:.3f} [{r['low']:.3f}, {r['high']:.3f}]" for t, r in by_task.items()))
    if "compressed" in report:
        kept, ref = report["compressed"]["variant"], models[report["compressed"]["from"]]
        lines.append(f"{kept} vs the float32 student it came from: {ref['bytes'] / models[kept]['bytes']:.1f}x smaller file, "
                     f"{models[kept]['cpu_throughput']['batch256'] / ref['cpu_throughput']['batch256']:.2f}x throughput at batch 256")
    return "[report]\n" + "\n".join("  " + line for line in lines)


def markdown(report: dict, plots: list[str]) -> str:
    names = list(report["models"])
    out = ["# distillery report", ""]
    if "warm_start" in report:
        out += [f"A warm-started run: `student_previous` is the bundle it continued from "
                f"(`{report['warm_start']['bundle']}`), measured on this run's data.", ""]
    out += ["## Test metrics", ""]
    for t, row in report["tasks"].items():
        cols = names + [f"{b} (baseline)" for b in row["baselines"]]
        out += [f"### {t}", "", "| metric | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        for m in TASKS[t].metrics:
            vals = [row[n].get(m) for n in names] + [b.get(m) for b in row["baselines"].values()]
            if all(v is None for v in vals):
                continue
            label = m + (" (100 sampled negatives, SASRec protocol)" if m.endswith("_sampled100") else "")
            out.append(f"| {label} | " + " | ".join("" if v is None else f"{v:.4f}" for v in vals) + " |")
        out.append("")
    relative = report.get("relative_to_teacher", {})
    if relative:
        level = next(iter(next(iter(relative.values())).values()), {}).get("level", 0.95)
        out += [f"## Relative to the teacher (test split; paired bootstrap, {level:.0%} interval)", "",
                "The student's score metric over the teacher's, both on the same resampled test examples "
                "(CTR: the same users).", "",
                "| model | " + " | ".join(f"{t} {SCORE_METRIC[t]}" for t in report["tasks"]) + " |",
                "|---|" + "---:|" * len(report["tasks"])]
        for n, by_task in relative.items():
            out.append(f"| {n} | " + " | ".join(
                f"{by_task[t]['ratio']:.3f} [{by_task[t]['low']:.3f}, {by_task[t]['high']:.3f}]" if t in by_task else ""
                for t in report["tasks"]) + " |")
        out.append("")
    tasks = list(next(iter(report["models"].values())).get("cpu_latency_ms_by_task", {}))
    out += ["## Models (CPU, one thread; one request = one example of every task)", "",
            "| model | parameters | bytes | p50 ms | p99 ms | " + "".join(f"{t} p50 ms | " for t in tasks)
            + "req/s batch 1 | req/s batch 256 |", "|---|" + "---:|" * (6 + len(tasks))]
    for n, m in report["models"].items():
        out.append(f"| {n} | {m['params']:,} | {m['bytes']:,} | {m['cpu_latency_ms']['p50']:.2f} | "
                   f"{m['cpu_latency_ms']['p99']:.2f} | " + "".join(f"{m['cpu_latency_ms_by_task'][t]:.2f} | " for t in tasks)
                   + f"{m['cpu_throughput']['batch1']:,.0f} | {m['cpu_throughput']['batch256']:,.0f} |")
    out += ["", "## Dataset", "", "```", _json(report["dataset"]), "```", ""]
    out += [f"![{p}]({p})" for p in plots]
    return "\n".join(out) + "\n"


def _json(obj) -> str:
    import json
    return json.dumps(obj, indent=2)


def write_plots(report: dict, histories: dict, folder: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["models"])
    tasks = [t for t in SCORE_METRIC if t in report["tasks"]]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        m, row = SCORE_METRIC[t], report["tasks"][t]
        labels = names + list(row["baselines"])
        vals = [row[n][m] for n in names] + [b[m] for b in row["baselines"].values()]
        ax.bar(range(len(vals)), vals, color=[f"C{i}" for i in range(len(names))] + ["0.6"] * len(row["baselines"]))
        ax.set_xticks(range(len(vals)), labels, rotation=25, ha="right", fontsize=8)
        ax.set_title(f"{t}: {m} (test)")
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "tasks.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    for i, n in enumerate(names):
        mm = report["models"][n]
        ax.scatter(mm["params"], mm["cpu_latency_ms"]["p50"], s=60, color=f"C{i}", label=n)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("p50 latency, batch 1 (ms, 1 CPU thread)")
    ax.legend(fontsize=8)
    ax.set_title("size vs latency")
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "size_latency.png"), dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for n, hist in histories.items():
        if hist:  # a model keeps its colour of the other plots
            epochs, color = [h["epoch"] + 1 for h in hist], f"C{names.index(n)}"
            axes[0].plot(epochs, [h["loss"].get("total", float("nan")) for h in hist], marker="o", color=color, label=n)
            axes[1].plot(epochs, [h["score"] for h in hist], marker="o", color=color, label=n)
    axes[0].set_title("training loss per epoch")
    axes[1].set_title("validation score (mean ratio to the teacher)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "training.png"), dpi=110)
    plt.close(fig)
    return ["tasks.png", "size_latency.png", "training.png"]


def _sequence_metric(histories: dict[str, list]) -> str:
    """The metric a sequence model's history scores (`SequenceTasks.scored_by`'s)."""
    for hist in histories.values():
        if hist:
            return SequenceTasks.of(hist[0]["valid"]).score_metric
    return "score"


def teacher_plot(teacher_dir: str, folder: str) -> list[str]:
    """teacher.png: validation NDCG@10 against epochs of every sequence model of the teacher's grid
    and of the SASRec baseline's (the chosen ones solid), and each text classifier's validation
    score per epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teacher = TeacherDir(teacher_dir)

    def runs(kind: str) -> dict[str, list]:
        return {n: _read_history(part.history) for n, part in teacher.trained(kind).items()}

    metrics = storage.read_json(teacher.metrics)
    seq = {**runs("members"), **runs("sasrec")}
    chosen = {*metrics.get("teacher_members", []), metrics.get("sasrec_chosen")}
    text = {t: _read_history(teacher.classifier(t).history) for t in metrics.get("text_epochs", {})}
    if not seq and not any(text.values()):
        return []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, (name, hist) in enumerate(seq.items()):
        vals = [(h["epoch"] + 1, h["score"]) for h in hist]
        if vals:
            style = "-" if name in chosen else ":"
            axes[0].plot(*zip(*vals), style, marker=".", color=f"C{i}", label=name)
    axes[0].set_title(f"sequence models: validation {_sequence_metric(seq)}")
    for task, hist in text.items():
        metric = TASKS[task].score_metric
        axes[1].plot([h["epoch"] + 1 for h in hist], [h["valid"][task][metric] for h in hist], marker="o",
                     label=f"{task} {metric}")
    axes[1].set_title("text classifiers: validation score")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a run without sequence models or text tasks has none
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "teacher.png"), dpi=110)
    plt.close(fig)
    return ["teacher.png"]
