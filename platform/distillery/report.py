"""The `report` stage: teacher, students and baselines side by side in RUN_DIR/report/
(report.json, report.md, PNG plots).

report.json (a contract; later stages add their models under "models" and "tasks"):
    {"dataset": {...counts...},
     "models": {name: {"params", "bytes", "cpu_latency_ms": {"p50", "p99"},
                       "cpu_throughput": {"batch1", "batch256"}}},
     "tasks": {task: {name: {metric: value}, "baselines": {baseline: {metric: value}}}}}

Latency: one request = one example of every task (a user's history scored against the whole
catalogue, one CTR candidate, one shopping text), tokenization and input tensors included, item
vectors cached as a server would. The teacher's per-task functions run as frozen TorchScript traces
(`_traced`), the students through `runtime.StudentRuntime`, the code that serves them. All models
are timed in this one process on one thread (a Serve replica's CPU), interleaved in blocks of 20
requests in a shuffled order of models, so machine noise hits them alike and each runs warm, as on
its own replica. Throughput is requests per second at batch 1 (1000 / mean latency) and at batch 256.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time

import numpy as np
import torch

from . import storage
from . import student as S
from .config import RunConfig
from .data.examples import read_split
from .errors import StageError
from .layout import RunLayout, TeacherDir
from .metrics import SCORE_METRIC
from .progress import say
from .runtime import StudentRuntime, pad
from .student_model import longs
from .teacher import load_model
from .teacher_model import text_inputs

METRICS = {"recommendation": ["hr@10", "ndcg@10", "mrr", "hr@10_sampled100", "ndcg@10_sampled100"],
           "ctr": ["auc", "gauc", "logloss"], "intent": ["accuracy", "macro_f1"]}


# ------------------------------------------------------------------------------ latency
def _requests(prepare_dir: str, tasks, n: int, seed: int) -> list[dict]:
    """n requests drawn from the test split, each with one example of every task."""
    rng = np.random.default_rng(seed)
    frames = {t: read_split(prepare_dir, t, "test") for t in tasks}
    rows = {t: df.iloc[rng.integers(0, len(df), n)] for t, df in frames.items() if len(df)}
    out = []
    for i in range(n):
        r = {}
        if "recommendation" in rows:
            r["rec_history"] = list(rows["recommendation"]["history"].iloc[i])
        if "ctr" in rows:
            row = rows["ctr"].iloc[i]
            r["ctr"] = (list(row["history"]), int(row["item"]), -1 if row["slot"] != row["slot"] else int(row["slot"]))
        if "intent" in rows:
            r["text"] = rows["intent"]["text"].iloc[i]
        out.append(r)
    return out


def _server(rec, ctr, intent, histories):
    """serve(requests) -> seconds per task; inputs are built inside the timed part, as a server
    would. histories(id lists, task) -> the padded history tensor the model's rec/ctr take."""
    def serve(reqs: list[dict]) -> dict[str, float]:
        took, t0 = {}, time.perf_counter()
        if "rec_history" in reqs[0]:
            rec(histories([r["rec_history"] for r in reqs], "recommendation")).topk(10, dim=1)
            took["recommendation"], t0 = time.perf_counter() - t0, time.perf_counter()
        if "ctr" in reqs[0]:
            torch.sigmoid(ctr(histories([r["ctr"][0] for r in reqs], "ctr"),
                              longs([r["ctr"][1] for r in reqs]), longs([r["ctr"][2] for r in reqs])))
            took["ctr"], t0 = time.perf_counter() - t0, time.perf_counter()
        if "text" in reqs[0]:
            intent([r["text"] for r in reqs]).softmax(-1)
            took["intent"] = time.perf_counter() - t0
        return took
    return serve


class _Call(torch.nn.Module):
    """fn(model, *inputs) as a module, so that its trace can be frozen."""

    def __init__(self, model: torch.nn.Module, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, *inputs):
        return self.fn(self.model, *inputs)


def _traced(model: torch.nn.Module, fn, *example):
    """fn(model, *inputs) as a frozen TorchScript trace: eager PyTorch spends ~10 us of Python
    dispatch per op on this CPU, most of a small model's time at batch 1. Teacher and students are
    all timed this way, as a CPU server would run them."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python values baked into the graph
        return torch.jit.freeze(torch.jit.trace(_Call(model, fn).eval(), example, check_trace=False))


def _heads(model, items, rec_history: int, ctr_history: int):
    h_rec, h_ctr = torch.zeros(2, rec_history, dtype=torch.long), torch.zeros(2, ctr_history, dtype=torch.long)
    h_rec[:, -1] = h_ctr[:, -1] = 2
    two = torch.tensor([2, 3])
    rec = _traced(model, lambda m, h: m.rec_scores(h, items), h_rec)
    ctr = _traced(model, lambda m, h, i, s: m.ctr_logits(h, i, s, items), h_ctr, two, torch.tensor([-1, 0]))
    return rec, ctr


@torch.inference_mode()
def teacher_server(model, tokenizer, max_length: int, ctr_history: int):
    model.eval().requires_grad_(False)  # a trace keeps the weights as constants
    items = model.item_vectors()
    rec_history = model.max_history
    rec, ctr = _heads(model, items, rec_history, ctr_history)

    def inputs(texts):
        return tuple(text_inputs(tokenizer, texts, max_length=max_length, buckets=model.lexical_buckets).values())

    intent = _traced(model, lambda m, *x: m.intent_logits(*x), *inputs(["red gel pen", "a longer query about chairs"]))
    return _server(rec, ctr, lambda texts: intent(*inputs(texts)),
                   lambda h, task: pad(h, rec_history if task == "recommendation" else ctr_history))


def student_server(model, tokenizer, meta: dict):
    """The student as served: `runtime.StudentRuntime` (item and text products folded at load)."""
    rt = StudentRuntime(model, tokenizer, meta)
    return _server(rt.rec_scores, rt.ctr_logits, lambda texts: rt.intent_logits(*rt.text_inputs(texts)),
                   rt.histories)


@torch.inference_mode()
def measure_latency(servers: dict, requests: list[dict], *, repeats_256: int = 3, warmup: int = 10,
                    block: int = 20) -> dict:
    """{name: {"cpu_latency_ms": {p50, p99}, "cpu_latency_ms_by_task": {task: p50},
    "cpu_throughput": {batch1, batch256}}}; interleaved in blocks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = {name: [] for name in servers}
        for r in requests[:warmup]:
            for serve in servers.values():
                serve([r])
        # Blocks of `block` requests per model, the models in a fresh order every round: drift on a
        # noisy machine hits all alike, and each model runs warm as on its own replica rather than
        # right after another model has swept the caches (that cost the students ~0.1 ms a request).
        rng = np.random.default_rng(0)
        for a in range(0, len(requests), block):
            for name in rng.permutation(list(servers)):
                for r in requests[a:a + block]:
                    times[name].append({t: s * 1000 for t, s in servers[name]([r]).items()})
        big = (requests * (256 // len(requests) + 1))[:256]
        t256 = {name: [] for name in servers}
        for _ in range(repeats_256):
            for name, serve in servers.items():
                t256[name].append(sum(serve(big).values()))
    finally:
        torch.set_num_threads(threads)
    out = {}
    for name, per_request in times.items():
        total = [sum(r.values()) for r in per_request]
        out[name] = {"cpu_latency_ms": {"p50": float(np.percentile(total, 50)), "p99": float(np.percentile(total, 99))},
                     "cpu_latency_ms_by_task": {t: float(np.median([r[t] for r in per_request])) for t in per_request[0]},
                     "cpu_throughput": {"batch1": 1000.0 / float(np.mean(total)),
                                        "batch256": 256 / statistics.median(t256[name])}}
    return out


# ------------------------------------------------------------------------------ the stage
def _size(model_dir: str) -> int:
    fs, path = storage.resolve(storage.join(model_dir, "model.safetensors"))
    return fs.get_file_info(path).size


def run(cfg: RunConfig, out_dir: str) -> dict:
    layout = RunLayout(cfg.run_dir)
    prepare_dir = layout.prepare.root
    teacher_metrics = storage.read_json(layout.teacher.metrics)
    tasks = [t for t in cfg.tasks.enabled() if t in teacher_metrics["test"]]
    teacher_dir = layout.teacher.model
    teacher, t_tok, t_meta = load_model(teacher_dir)
    variants = {}
    for name in ("student", "student_no_kd"):
        d = layout.distill.variant(name)
        if not storage.exists(d.metrics):
            raise StageError(f"{d.metrics} is missing: run the distill stage first (--stages distill,report)")
        variants[name] = (*S.load(d.model), storage.read_json(d.metrics), d.model)

    variants.update(_later_stages(cfg.run_dir))
    warm = layout.distill.warm_start
    warm_start = storage.read_json(warm) if storage.exists(warm) else None
    if warm_start:  # the student this run continued from, measured on this run's window
        from . import bundle

        model, tok, config, *_ = bundle.load(warm_start["bundle"])
        variants["student_previous"] = (model, tok, config, warm_start["previous"], warm_start["bundle"])

    say(f"[report] timing teacher and students on one CPU thread ({cfg.report.latency_requests} requests each, interleaved)")
    requests = _requests(prepare_dir, tasks, cfg.report.latency_requests, cfg.seed)
    servers = {"teacher": teacher_server(teacher, t_tok, t_meta["max_length"], cfg.tasks.ctr.max_history),
               **{n: student_server(m, tok, meta) for n, (m, tok, meta, _, _) in variants.items()}}
    speed = measure_latency(servers, requests)
    models = {"teacher": {"params": sum(p.numel() for p in teacher.parameters()), "bytes": _size(teacher_dir),
                          **speed["teacher"]}}
    for n, (m, _, _, _, d) in variants.items():
        models[n] = {"params": sum(p.numel() for p in m.parameters()), "bytes": _size(d), **speed[n]}

    task_report = {}
    for t in tasks:
        task_report[t] = {"teacher": teacher_metrics["test"][t],
                          **{n: v[3]["test"][t] for n, v in variants.items()},
                          "baselines": teacher_metrics.get("baselines", {}).get(t, {})}
    prep = storage.read_json(layout.prepare.manifest)
    report = {"dataset": {**prep.get("counts", {}), "examples": prep.get("examples", {})},
              "models": models, "tasks": task_report}
    if warm_start:
        report["warm_start"] = {"bundle": warm_start["bundle"], "previous_run": warm_start["previous_run"]}
    for stage, path in (("tune", layout.tune.summary), ("compress", layout.compress.variants)):
        if storage.exists(path):
            report[stage] = storage.read_json(path)
    histories = {n: _read_history(layout.distill.variant(n).history) for n in variants}
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


def _later_stages(run_dir: str) -> dict:
    """{name: (model, tokenizer, meta, metrics, model folder)} of the tune stage's winner
    ("student_tuned") and the compress stage's kept variant (loaded from the verified bundle), when
    those stages ran. The kept variant is left out when it is the uncompressed winner itself."""
    from . import bundle

    out, layout = {}, RunLayout(run_dir)
    best = layout.tune.best
    if storage.exists(best.metrics):
        out["student_tuned"] = (*S.load(best.model), storage.read_json(best.metrics), best.model)
    chosen = layout.compress.metrics
    if storage.exists(chosen):
        metrics = storage.read_json(chosen)
        if metrics["variant"] != "student":
            model, tok, config, *_ = bundle.load(layout.bundle)
            out[metrics["variant"]] = (model, tok, config, metrics, layout.bundle)
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
    kept = report.get("compress") and next((n for n in names if n.startswith("student_") and
                                            n not in ("student_no_kd", "student_tuned")), None)
    if kept:
        ref = models.get("student_tuned") or s
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
        for m in METRICS[t]:
            vals = [row[n].get(m) for n in names] + [b.get(m) for b in row["baselines"].values()]
            if all(v is None for v in vals):
                continue
            label = m + (" (100 sampled negatives, SASRec protocol)" if m.endswith("_sampled100") else "")
            out.append(f"| {label} | " + " | ".join("" if v is None else f"{v:.4f}" for v in vals) + " |")
        out.append("")
    tasks = list(next(iter(report["models"].values())).get("cpu_latency_ms_by_task", {}))
    out += ["## Models (CPU, one thread; one request = one example of every task)", "",
            "| model | parameters | bytes | p50 ms | p99 ms | " + "".join(f"{t} p50 ms | " for t in tasks)
            + "req/s batch 1 | req/s batch 256 |", "|---|" + "---:|" * (7 + len(tasks))]
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
    for i, (n, hist) in enumerate(histories.items()):
        if hist:
            epochs = [h["epoch"] + 1 for h in hist]
            axes[0].plot(epochs, [h["loss"].get("total", float("nan")) for h in hist], marker="o", color=f"C{i}", label=n)
            axes[1].plot(epochs, [h["score"] for h in hist], marker="o", color=f"C{i}", label=n)
    axes[0].set_title("training loss per epoch")
    axes[1].set_title("validation score (mean ratio to the teacher)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "training.png"), dpi=110)
    plt.close(fig)
    return ["tasks.png", "size_latency.png", "training.png"]


def teacher_plot(teacher_dir: str, folder: str) -> list[str]:
    """teacher.png: validation NDCG@10 against epochs of the teacher's sequence members and of every
    SASRec baseline tried (the chosen one solid), and the encoder's intent macro-F1 per epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teacher = TeacherDir(teacher_dir)

    def runs(kind: str) -> dict[str, list]:
        return {n: _read_history(part.history) for n, part in teacher.trained(kind).items()}

    metrics = storage.read_json(teacher.metrics)
    seq = {f"teacher member {n}": h for n, h in runs("members").items()}
    seq.update(runs("sasrec"))
    intent = _read_history(teacher.intent.history)
    if not seq and not intent:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, (name, hist) in enumerate(seq.items()):
        vals = [(h["epoch"] + 1, h["valid"]["recommendation"]["ndcg@10"]) for h in hist if "recommendation" in h["valid"]]
        if vals:
            style = "-" if name.startswith("teacher") or name == metrics.get("sasrec_chosen") else ":"
            axes[0].plot(*zip(*vals), style, marker=".", color=f"C{i}", label=name)
    axes[0].set_title("sequence models: validation NDCG@10")
    axes[1].plot([h["epoch"] + 1 for h in intent], [h["valid"]["intent"]["macro_f1"] for h in intent], marker="o")
    axes[1].set_title("intent encoder: validation macro-F1")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "teacher.png"), dpi=110)
    plt.close(fig)
    return ["teacher.png"]
