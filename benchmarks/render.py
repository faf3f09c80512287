"""The README's "Results" section, generated from benchmarks/results/*.json (never typed by hand).

    python benchmarks/render.py [--readme README.md] [--check]

Rewrites what lies between the `<!-- results:begin -->` and `<!-- results:end -->` markers. A table
whose JSON file is missing is left out with a line that says which script writes it. `--check`
exits 1 when the README is out of date (the tests run it).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _missing(name: str, script: str) -> str:
    return f"_No `results/{name}.json` yet: run `python benchmarks/{script}`._\n"


def quality(name: str = "quality_office", title: str = "Quality on Amazon Office", run: str = "quality.py") -> str:
    q = _load(name)
    if q is None:
        return _missing(name, run)
    requested = q.get("seeds_requested", q["seeds"])
    n = len(q["seeds"])
    if n == 1:
        seeds = f"one seed (seed {q['seeds'][0]}), so no spread"
    else:
        seeds = f"mean ± std over {n} seeds"
    if n < len(requested):
        seeds += f"; {n} of the {len(requested)} seeds requested, the run was cut short"
    if (reused := q.get("reused")) and reused["seeds"]:
        seeds += (f"; seed{'s' if len(reused['seeds']) > 1 else ''} {', '.join(map(str, reused['seeds']))} "
                  f"taken from an earlier run's results (`{Path(reused['file']).name}`)")
    lines = [f"**{title}** (test split, {seeds}; every model, the baselines included, "
             f"trained once per seed on the same split; `results/{name}.json`)", "",
             "| task | metric | teacher | KD student | no-KD student | SASRec | other baseline | student / teacher |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]

    def cell(v):  # a number (one run) or {mean, std, runs}
        if not isinstance(v, dict):
            return f"{v:.4f}"
        return f"{v['mean']:.4f} ± {v['std']:.4f}" if v["std"] else f"{v['mean']:.4f}"

    for task, s in q["summary"].items():
        others = [k for k, v in s.items() if isinstance(v, (dict, float)) and k not in
                  ("teacher", "student", "student_no_kd", "sasrec", "student_over_teacher")]
        other = "<br>".join(f"{cell(s[k])} ({k})" for k in others) or "–"
        lines.append(f"| {task} | {s['metric']} | {cell(s['teacher'])} | {cell(s['student'])} | "
                     f"{cell(s['student_no_kd'])} | {cell(s['sasrec']) if 'sasrec' in s else '–'} | {other} | "
                     f"{s['student_over_teacher']:.3f} |")
    intervals = {seed: r["student_over_teacher_interval"] for seed, r in q.get("per_seed", {}).items()
                 if r.get("student_over_teacher_interval")}
    for seed, by_task in intervals.items():
        lines += ["", f"KD student / teacher on seed {seed}'s test split, with a paired bootstrap 95% interval "
                      "(the report's `relative_to_teacher`; the split's size, not the seeds, sets its width): "
                  + ", ".join(f"{t} {r['ratio']:.3f} [{r['low']:.3f}, {r['high']:.3f}]" for t, r in by_task.items())
                  + "."]
    size = q.get("size_speed_median")
    if size:
        lines += ["", f"Student vs teacher (report stage, median over seeds): {size['params_ratio']:.1f}x fewer "
                      f"parameters, {size['p50_ratio']:.1f}x lower p50 CPU latency at batch 1."]
    if q.get("targets"):
        met = [k for k, v in q["targets"].items() if v]
        missed = [k for k, v in q["targets"].items() if v is False]
        open_ = [k for k, v in q["targets"].items() if v is None]  # a spread needs two seeds or more
        lines += ["", f"Targets met ({len(met)}/{len(q['targets'])}): " + ", ".join(f"`{k}`" for k in met) + "."]
        if missed:
            lines += ["Missed: " + ", ".join(f"`{k}`" for k in missed) + "."]
        if open_:
            lines += ["Not decided by one seed: " + ", ".join(f"`{k}`" for k in open_) + "."]
    return "\n".join(lines) + "\n"


def kd_class_balance() -> str:
    k = _load("kd_class_balance_office")
    if k is None:
        return _missing("kd_class_balance_office", "kd_class_balance.py")
    ref = f"{k['powers'][0]:g}"
    lines = [f"**Class-balanced intent distillation on Office** (`tasks.intent.kd_class_power`; the KD student distilled "
             f"from one teacher's labels, student seeds {', '.join(map(str, k['seeds']))}; mean ± std; "
             "`results/kd_class_balance_office.json`)", "",
             "| task | metric | power | valid | test | test, paired change vs power " + ref + " | teacher (test) |",
             "|---|---|---:|---:|---:|---:|---:|"]

    def pm(v, sign=""):
        return f"{v['mean']:{sign}.4f} ± {v['std']:.4f}" if v else "–"

    for task, row in k["summary"].items():
        for power, r in ((p, v) for p, v in row.items() if p != "metric"):
            lines.append(f"| {task} | {row['metric']} | {power} | {pm(r['valid'])} | {pm(r['test'])} | "
                         f"{pm(r.get(f'test_minus_power_{ref}'), '+')} | {k['teacher_test'][task]:.4f} |")
    return "\n".join(lines) + "\n"


def sweep() -> str:
    t = _load("tune_compress")
    if t is None:
        return _missing("tune_compress", "tune_compress.py")
    s = t["sweep"]
    lines = [f"**Sweep on Office** ({t['trials']} trials of at most {t['epochs_per_trial']} epochs, over seed 0's "
             "teacher and labels; `results/tune_compress.json`)", "",
             "| | value |", "|---|---:|",
             f"| trials (stopped early by ASHA) | {t['trials']} ({s['stopped_early']}) |",
             f"| best validation score / the defaults trial's | {s['best_valid_score']:.3f} / "
             f"{s['defaults_trial_score']:.3f} ({100 * s['relative_gain_over_defaults']:+.1f}%) |"]
    for name in ("temperature", "alpha"):  # the per-task values the task defaults were set from
        if name in s.get("best_params", {}):
            lines.append(f"| best trial's {name} (" + " / ".join(s["best_params"][name]) + ") | "
                         + " / ".join(f"{v:.2f}" for v in s["best_params"][name].values()) + " |")
    return "\n".join(lines) + "\n"


def compression() -> str:
    c = _load("compress_office")
    if c is None:
        return _missing("compress_office", "compress.py")
    rows = c["variants"]
    tasks = list(rows[0]["test_drops"])
    head = (["variant", "parent", "file (MB)", "parameters", "p50 b1 (ms)", "b256 (req/s)"]
            + [f"{t} (test)" for t in tasks] + ["worst on valid (the choice)"])
    lines = [f"**Compression on Office** (the {c['student_source']} stage's student; every variant timed interleaved in "
             "one process on one thread; change against the float32 student; `results/compress_office.json`)", "",
             "| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for r in rows:
        name = f"**{r['name']}** (kept)" if r["name"] == c["kept"] else r["name"]
        worst = min(r["drops"], key=lambda t: -r["drops"][t])
        lines.append(f"| {name} | {r['parent'] or '–'} | {r['bytes'] / 1e6:.2f} | {r['params']:,} | {r['p50_ms']:.3f} | "
                     f"{r['throughput_b256']:,.0f} | " + " | ".join(f"{-100 * r['test_drops'][t]:+.2f}%" for t in tasks)
                     + f" | {worst} {-100 * r['drops'][worst]:+.2f}%{'' if r['within_budget'] else ' (over budget)'} |")
    base, kept = rows[0], next(r for r in rows if r["name"] == c["kept"])
    met = [k for k, v in c["targets"].items() if v]
    missed = [k for k, v in c["targets"].items() if not v]
    lines += ["", f"Kept {c['kept']}: weights {c['ratios']['fp32_over_bundle']:.1f}x smaller than the float32 student and "
              f"{c['ratios']['teacher_over_bundle']:.1f}x smaller than the teacher's ({c['teacher_bytes'] / 1e6:.1f} MB); "
              f"batch-1 p50 {kept['p50_ms']:.3f} against {base['p50_ms']:.3f} ms, batch-256 throughput "
              f"{kept['throughput_b256'] / base['throughput_b256']:.2f}x.",
              "", "Targets met: " + (", ".join(f"`{k}`" for k in met) or "none") + "."]
    if missed:
        lines.append("Missed: " + ", ".join(f"`{k}`" for k in missed) + ".")
    return "\n".join(lines) + "\n"


def serving() -> str:
    r = _load("serve")
    if r is None:
        return _missing("serve", "serve_load.py")
    c = 8 if 8 in r["levels"] else r["levels"][0]
    names = {"serve-student": "Serve, `distillery serve` default (direct ingress)",
             "serve-student-ray-defaults": "Serve, Ray's default path (Python proxy, access log)",
             "serve-deploy": "Serve, `serve deploy serve/config.yaml` (HAProxy, as cluster.yaml starts Ray)",
             "serve-student-split": "Serve, split (ingress and model apart, direct ingress)", "serve-student-direct": "Serve, direct ingress (scanned port)",
             "bare-student": "bare uvicorn, no Ray", "serve-teacher": "teacher, Serve (default)",
             "serve-teacher-ray-defaults": "teacher, Serve (Ray's default path)", "bare-teacher": "teacher, bare uvicorn"}
    endpoints = [e for e in ("recommend", "ctr", "intent", "healthz") if e in next(iter(r["results"].values()))]
    lines = [f"**Serving** ({c} concurrent closed-loop clients on loopback, p50 / p99 ms and requests/s, each the median "
             f"of {r.get('repeats', 1)} runs; catalogue of {r['catalogue_size']:,} items; CTR with 100 candidates; "
             "`results/serve.json`)", "",
             "| server | " + " | ".join(endpoints) + " |", "|---|" + "---:|" * len(endpoints)]
    for name, res in r["results"].items():
        cells = []
        for e in endpoints:
            row = next(x for x in res[e] if x["clients"] == c)
            cells.append(f"{row['p50_ms']:.1f} / {row['p99_ms']:.1f} ({row['throughput_rps']:,.0f})")
        lines.append(f"| {names.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def labeling() -> str:
    lab = _load("labeling")
    if lab is None:
        return _missing("labeling", "labeling.py")
    lines = ["**Labeling against a plain PyTorch loop** (same teacher and examples, tokenization included; "
             "`results/labeling.json`)", "",
             "| machine | teacher | rows | plain loop rows/s | stage | labeling rows/s | ratio | end-to-end ratio |",
             "|---|---|---:|---:|---|---:|---:|---:|"]
    for section in ("cpu", "gpu"):
        run = lab.get(section)
        if not run:
            continue
        machine = run.get("gpu_name") or f"CPU, {run['machine']['cpus']} cores"
        for workers, st in run["stage"].items():
            lines.append(f"| {machine} | {run['teacher']} | {run['rows']:,} | {run['plain']['rows_per_s']:,.0f} "
                         f"| {workers} worker(s), {st['cpus_per_worker']:g} CPU | {st['rows_per_s']:,.0f} "
                         f"| {st['ratio_labeling']:.2f} | {st['ratio_end_to_end']:.2f} |")
    return "\n".join(lines) + "\n"


def warm_start() -> str:
    w = _load("warm_start")
    if w is None:
        return _missing("warm_start", "warm_start.py")
    warm, cold = w["runs"]["warm"], w["runs"]["scratch"]
    lab = warm["labels"]
    lines = [f"**Incremental re-distillation** (demo shop; window 1 = clicks before the {w['fraction']:.0%} time "
             f"quantile, {w['interactions']['w1']:,} interactions; window 2 = all {w['interactions']['w2']:,}; "
             "window 2 warm-started from window 1's bundle and from scratch, one after the other; "
             "`results/warm_start.json`)", "",
             f"Labels reused: {lab['reused']:,} of {lab['total']:,} ({w['ratios']['labels_reused_share']:.1%}); "
             f"the teacher labelled {lab['labelled']:,} "
             f"({', '.join(f'{t} {n:,}' for t, n in lab['labelled_by_task'].items())}).", "",
             "| window 2 | teacher s | label s | distill s | all stages s |", "|---|---:|---:|---:|---:|"]
    for name, run in (("from scratch", cold), ("warm start", warm)):
        wall = run["wall_s"]
        lines.append(f"| {name} | {wall['teacher']:.0f} | {wall['label']:.0f} | {wall['distill']:.0f} "
                     f"| {sum(wall.values()):.0f} |")
    lines += ["", "| test metric on window 2 | earlier bundle | warm-start bundle | from-scratch bundle "
                  "| teacher (reused) | teacher (retrained) |", "|---|---:|---:|---:|---:|---:|"]
    for task, metric in (("recommendation", "ndcg@10"), ("ctr", "auc"), ("intent", "macro_f1")):
        if task in warm["test"]["bundle"]:
            vals = [warm["test"]["previous_bundle"], warm["test"]["bundle"], cold["test"]["bundle"],
                    warm["test"]["teacher"], cold["test"]["teacher"]]
            lines.append(f"| {task} {metric} | " + " | ".join(f"{v[task][metric]:.4f}" for v in vals) + " |")
    return "\n".join(lines) + "\n"


def prepare() -> str:
    p = _load("prepare")
    if p is None:
        return _missing("prepare", "prepare.py")
    lines = ["**Prepare** (Ray Data, median of the runs; `results/prepare.json`)", "",
             "| interactions | file format | shuffle | Parquet reader | median s | rows/s |", "|---:|---|---|---|---:|---:|"]
    for row in p["results"]:
        lines.append(f"| {row['interactions']:,} | {row.get('format', 'parquet')} | {row['shuffle']} "
                     f"| {row.get('parquet_reader', 'tasks')} | {row['median_s']:.1f} "
                     f"| {row['interactions'] / row['median_s']:,.0f} |")
    return "\n".join(lines) + "\n"


def reliability() -> str:
    r = _load("reliability")
    if r is None:
        return _missing("reliability", "reliability.py")
    return "\n".join([
        "**Reliability** (every `fault` and `fuzz` test; `results/reliability.json`)", "",
        "| faults injected | survived | bad inputs tried | handled | pipeline inputs (ragged shops) | handled "
        "| rows lost | 5xx | Serve replica killed: recovery s | failed requests |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {r['faults_injected']} | {r['faults_survived']} | {r['bad_inputs_tried']:,} | {r['bad_inputs_handled']:,} "
        f"| {r.get('pipeline_inputs', 'not run')} | {r.get('pipeline_inputs_handled', '-')} "
        f"| {r['rows_lost']} | {r['server_errors_5xx']} | {r['serve_recovery_s']:.1f} "
        f"| {r['serve_failed_requests']} of {r['serve_requests_after_kill']:,} |"]) + "\n"


def render() -> str:
    magazine = quality("quality_magazine", "Review sentiment on Amazon Magazine reviews",
                       "quality.py --data ../shared/data/amazon18_magazine_subscriptions --config configs/magazine.yaml "
                       "--work runs/magazine --out benchmarks/results/quality_magazine.json")
    parts = [quality(), magazine, kd_class_balance(), compression(), sweep(), serving(), labeling(), warm_start(), prepare(), reliability()]
    return (f"{BEGIN}\n<!-- generated by `python benchmarks/render.py` from benchmarks/results/*.json; "
            f"edits here are overwritten -->\n\n" + "\n".join(parts) + f"\n{END}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--readme", default=str(ROOT / "README.md"), help="the file with the markers (default README.md)")
    ap.add_argument("--check", action="store_true", help="exit 1 if the file is out of date, change nothing")
    args = ap.parse_args()
    path = Path(args.readme)
    text = path.read_text()
    if BEGIN not in text or END not in text:
        print(f"{path}: no {BEGIN} ... {END} markers; add them where the results belong")
        return 2
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    new = head + render() + tail
    if args.check:
        if new != text:
            print(f"{path}: the results section is out of date: run python benchmarks/render.py")
            return 1
        return 0
    path.write_text(new)
    print(f"{path}: results section rewritten from {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
