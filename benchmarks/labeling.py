"""Labeling throughput: the `label` stage (Ray Train) against a plain PyTorch loop over the same
teacher and the same examples, in one run.

    python benchmarks/labeling.py                                   # CPU: MiniLM teacher, 1 and 2 workers
    python benchmarks/labeling.py --teacher bert-base --gpu --tasks intent \\
        --long-texts 200000 --max-length 128 --text-batch-size 1024 --workers 1   # on a GPU machine

The plain loop is what a user would write by hand: one process, all cores, the same labeler
functions (tokenization included) over the same Parquet examples, results kept as Arrow tables and
written once. The stage adds Ray Train workers, Ray Data shards and atomic Parquet parts.

Reported per configuration (medians over --repeats, runs interleaved):
  labeling_s    the slowest worker's time from its first batch to its last part (startup excluded)
  end_to_end_s  the whole stage: Ray Train start, dataset split, labeling, the exactly-once check
  ratio         plain-loop seconds / stage seconds (1.0 = as fast as the plain loop)

The teacher's weights do not change throughput, so `--teacher minilm` uses the bundled MiniLM
encoder with untrained heads and `--teacher bert-base` a randomly initialized BERT-base (110M).
`--long-texts N` swaps the intent examples for N texts of at least --max-length tokens, so every
sequence has that length (the issue's GPU reference: a bf16 BERT-base forward at 128 tokens).
Writes the section `cpu` or `gpu` of benchmarks/results/labeling.json, and labeling.png.
"""
from __future__ import annotations

import argparse
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

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from distillery import runner, storage  # noqa: E402
from distillery.config import load_config  # noqa: E402
from distillery.data.examples import read_items  # noqa: E402
from distillery.layout import RunLayout  # noqa: E402
from distillery.models import teacher as teacher_model  # noqa: E402
from distillery.stages import label, teacher  # noqa: E402
from distillery.tasks import TASKS, LabelContext  # noqa: E402


def build_teacher(cfg, kind: str, run_dir: Path, tokenizer: str) -> int:
    """Save an untrained teacher where the teacher stage saves its model; return its parameter count."""
    from distillery.models.teacher import load_backbone, resolve_model_path
    from transformers import AutoTokenizer, BertConfig, BertModel

    if kind == "minilm":
        backbone, tok = load_backbone("all-MiniLM-L6-v2")
    elif kind == "bert-base":
        tok = AutoTokenizer.from_pretrained(resolve_model_path(tokenizer))
        backbone = BertModel(BertConfig(vocab_size=tok.vocab_size))  # 12 layers, 768 wide: BERT-base
    else:
        backbone, tok = load_backbone(kind)
    layout = RunLayout(str(run_dir))
    spec = teacher.teacher_spec(cfg, layout.prepare.root, text_dim=backbone.config.hidden_size)
    torch.manual_seed(0)
    model = teacher_model.build(backbone, spec, torch.randn(spec.n_items, backbone.config.hidden_size))
    teacher_model.save_model(model, tok, spec, layout.teacher.model)
    storage.write_json(layout.manifest("teacher"), {"stage": "teacher", "status": "complete",
                                                                     "benchmark_teacher": kind})
    return sum(p.numel() for p in model.parameters())


def long_intent_texts(run_dir: Path, n: int, max_length: int) -> None:
    """Replace the intent examples by `n` texts of >= max_length tokens (item titles strung together)."""
    prep = RunLayout(str(run_dir)).prepare
    titles = read_items(prep.root)["title"].tolist()
    rng = np.random.default_rng(0)
    words_needed = max_length  # a title word is at least one token
    texts = []
    for i in range(n):
        words: list[str] = []
        while len(words) < words_needed:
            words += titles[rng.integers(len(titles))].split()
        texts.append(" ".join(words))
    base = Path(prep.examples("intent"))
    shutil.rmtree(base)
    cut = {"train": (0, int(n * 0.8)), "valid": (int(n * 0.8), int(n * 0.9)), "test": (int(n * 0.9), n)}
    counts = {}
    for split, (a, b) in cut.items():
        (base / split).mkdir(parents=True)
        pq.write_table(pa.table({"example_id": [f"long-{i}" for i in range(a, b)], "text": texts[a:b],
                                 "label": pa.array(np.zeros(b - a, np.int32)), "label_name": ["x"] * (b - a),
                                 "split": [split] * (b - a), "count": pa.array(np.ones(b - a, np.int32))}),
                       base / split / "part-0.parquet")
        counts[split] = b - a
    manifest_path = Path(prep.manifest)
    manifest = json.loads(manifest_path.read_text())
    manifest["examples"]["intent"] = counts
    manifest_path.write_text(json.dumps(manifest, indent=2))


def plain_loop(cfg, run_dir: Path, device: str) -> dict[str, float]:
    """Seconds per task of a hand-written loop: same model, same labelers, same batches."""
    layout = RunLayout(str(run_dir))
    model, tok, spec = teacher_model.load_model(layout.teacher.model, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    with torch.no_grad(), autocast:
        items = model.item_vectors()
    out_dir = run_dir / "plain"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir()
    seconds = {}
    ctx = LabelContext(cfg=cfg, tokenizer=tok, spec=spec, items=items, device=device)
    for task in cfg.tasks.enabled():
        t0 = time.perf_counter()
        t = TASKS[task]
        table = pq.read_table(layout.prepare.examples(task), columns=["example_id", "split", *t.teacher_inputs])
        parts = []
        for batch in table.to_batches(max_chunksize=label.batch_size(t, cfg.label)):
            batch = pa.Table.from_batches([batch])
            with autocast:
                cols = t.label(model, batch, ctx)
            parts.append(pa.table({"example_id": batch.column("example_id"), "split": batch.column("split"), **cols,
                                   "fingerprint": t.fingerprints(batch)}, schema=t.label_schema))
        pq.write_table(pa.concat_tables(parts), out_dir / f"{task}.parquet")
        seconds[task] = time.perf_counter() - t0
    return seconds


def stage(cfg, workers: int, cpus: float, tokenize_cpus: float) -> dict:
    cfg = cfg.model_copy(update={"label": cfg.label.model_copy(update={
        "num_workers": workers, "cpus_per_worker": cpus, "tokenize_cpus": tokenize_cpus})})
    m = runner.run(cfg, ["label"], force=True)["label"]
    return {"labeling_s": sum(m["labeling_seconds"].values()), "per_task_s": m["labeling_seconds"],
            "end_to_end_s": m["wall_time_s"]}


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = [s for s in ("cpu", "gpu") if s in result]
    fig, axes = plt.subplots(1, len(sections), figsize=(6 * len(sections), 4), squeeze=False)
    for ax, name in zip(axes[0], sections):
        sec = result[name]
        rows = sec["rows"]
        labels, lab, e2e = ["plain loop"], [rows / sec["plain"]["seconds"]], [rows / sec["plain"]["seconds"]]
        for w, r in sec["stage"].items():
            labels.append(f"stage, {w} worker{'s' if w != '1' else ''}")
            lab.append(rows / r["labeling_s"])
            e2e.append(rows / r["end_to_end_s"])
        x = np.arange(len(labels))
        ax.bar(x - 0.2, lab, 0.4, label="labeling (startup excluded)")
        ax.bar(x + 0.2, e2e, 0.4, label="end to end")
        ax.set_xticks(x, labels)
        ax.set_ylabel("examples / s")
        ax.set_title(f"{name.upper()}: {sec['teacher']} teacher, {rows:,} examples")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="minilm", help="minilm (bundled), bert-base (random init) or a model folder")
    p.add_argument("--tokenizer", default="all-MiniLM-L6-v2",
                   help="tokenizer folder for --teacher bert-base (default: the bundled MiniLM's, BERT's uncased vocab)")
    p.add_argument("--gpu", action="store_true", help="label on CUDA (bf16) and write the `gpu` section")
    p.add_argument("--workers", default="1,2", help="label-stage worker counts to measure, comma-separated")
    p.add_argument("--tasks", default="recommendation,ctr,intent", help="tasks to label, comma-separated")
    p.add_argument("--users", type=int, default=1500, help="synthetic shop size (the demo's by default)")
    p.add_argument("--long-texts", type=int, default=0, help="replace intent texts by N texts of --max-length tokens")
    p.add_argument("--max-length", type=int, default=64, help="tokens per text (teacher.max_length)")
    p.add_argument("--batch-size", type=int, default=1024, help="label.batch_size (recommendation / CTR)")
    p.add_argument("--text-batch-size", type=int, default=128, help="label.text_batch_size (intent)")
    p.add_argument("--repeats", type=int, default=2, help="runs per configuration; medians are reported")
    p.add_argument("--work", default="/tmp/distillery-bench-label", help="scratch run directory")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "labeling.json"), help="results JSON")
    args = p.parse_args()

    device = "cuda" if args.gpu else "cpu"
    cpus = os.cpu_count() or 2
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    work = Path(args.work)
    overrides = [f"run_dir={work}", f"data.synthetic.users={args.users}", f"teacher.max_length={args.max_length}",
                 f"label.batch_size={args.batch_size}", f"label.text_batch_size={args.text_batch_size}",
                 f"label.use_gpu={str(args.gpu).lower()}", "label.rows_per_file=100000"]
    overrides += [f"tasks.{t}.enabled=false" for t in ("recommendation", "ctr", "intent") if t not in tasks]
    if args.teacher == "bert-base":  # the encoder alone, as in the reference number (no lexical bag)
        overrides.append("teacher.lexical_dim=0")
    cfg = load_config(ROOT / "configs" / "demo.yaml", overrides)
    runner.init_ray()
    runner.run(cfg, ["prepare"])
    if args.long_texts:
        long_intent_texts(work, args.long_texts, args.max_length)
    cfg = load_config(ROOT / "configs" / "demo.yaml", overrides)
    params = build_teacher(cfg, args.teacher, work, args.tokenizer)
    counts = label.expected_counts(cfg)
    rows = sum(sum(s.values()) for s in counts.values())
    torch.set_num_threads(cpus)
    print(f"labeling {rows:,} examples ({counts}) with a {params / 1e6:.1f}M-parameter {args.teacher} teacher on {device}")

    # GPU: one worker per GPU with 2 CPUs to feed it, the other CPUs for Ray Data's tokenization
    # tasks (1 CPU each); CPU: the machine shared out among the workers, half a CPU left to Ray Data
    def cpus_for(w: int) -> float:
        return max(0.5, (cpus - 0.5) / w) if not args.gpu else 2.0

    tokenize_cpus = 1.0  # used on GPU only (label.tokenize=auto tokenizes in the worker on CPU)

    runs: dict[str, list] = {"plain": []}
    worker_counts = [int(w) for w in args.workers.split(",")]
    for r in range(args.repeats):  # interleaved, so drift on a noisy machine hits every configuration alike
        s = plain_loop(cfg, work, device)
        runs["plain"].append(s)
        print(f"[repeat {r + 1}] plain loop: {sum(s.values()):.1f}s  {({k: round(v, 1) for k, v in s.items()})}")
        for w in worker_counts:
            res = stage(cfg, w, cpus_for(w), tokenize_cpus)
            runs.setdefault(str(w), []).append(res)
            print(f"[repeat {r + 1}] stage, {w} worker(s): labeling {res['labeling_s']:.1f}s, "
                  f"end to end {res['end_to_end_s']:.1f}s  {({k: round(v, 1) for k, v in res['per_task_s'].items()})}")

    plain_s = statistics.median(sum(s.values()) for s in runs["plain"])
    section = {
        "teacher": args.teacher, "params": params, "device": device, "rows": rows, "examples": counts,
        "max_length": args.max_length, "batch_size": args.batch_size, "text_batch_size": args.text_batch_size,
        "repeats": args.repeats,
        "plain": {"seconds": plain_s, "rows_per_s": rows / plain_s,
                  "per_task_s": {t: statistics.median(s[t] for s in runs["plain"]) for t in runs["plain"][0]}},
        "stage": {},
    }
    for w in worker_counts:
        lab = statistics.median(x["labeling_s"] for x in runs[str(w)])
        e2e = statistics.median(x["end_to_end_s"] for x in runs[str(w)])
        section["stage"][str(w)] = {
            "cpus_per_worker": cpus_for(w), "tokenize": label.tokenize_in(cfg.label.model_copy(update={"use_gpu": args.gpu})),
            "tokenize_cpus": tokenize_cpus, "labeling_s": lab, "end_to_end_s": e2e,
            "rows_per_s": rows / lab, "ratio_labeling": plain_s / lab, "ratio_end_to_end": plain_s / e2e,
            "per_task_s": {t: statistics.median(x["per_task_s"].get(t, 0.0) for x in runs[str(w)])
                           for t in runs[str(w)][0]["per_task_s"]},
        }
    if args.gpu:
        section["gpu_name"] = torch.cuda.get_device_name(0)
    section["machine"] = {"cpus": cpus, "platform": stdlib_platform.platform(), "torch": torch.__version__}

    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    result["gpu" if args.gpu else "cpu"] = section
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print(json.dumps(section, indent=2))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
