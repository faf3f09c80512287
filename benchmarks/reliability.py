"""Faults injected and bad inputs fuzzed: run the `fault` and `fuzz` tests, sum up what they did.

    python benchmarks/reliability.py [--out benchmarks/results/reliability.json] [--log FILE] [-- PYTEST ARGS]

Runs `pytest -m "fault or fuzz"` (13 minutes on 2 cores in the last run) with $DISTILLERY_RELIABILITY_LOG
set: each of those tests appends one JSON line (conftest.py's `reliability` fixture) with its
outcome and its counts. This script sums them into benchmarks/results/reliability.json:

  faults_injected / faults_survived   processes killed mid-work / of those, stages that still
                                      finished with the right output (the test passed)
  bad_inputs_tried / bad_inputs_handled  fuzzed rows, lines and requests / of those, the ones that
                                      came out as a clean row, a reject or a 4xx, as the test asserts
  pipeline_inputs / pipeline_inputs_handled  generated ragged shops (optional columns absent, null,
                                      partly null; tests/test_ragged.py) run through the stages / of
                                      those, the ones that ran through or were refused with a
                                      DistilleryError naming the column
  rows_lost                           rows that were neither in the output nor in the rejects
  server_errors_5xx                   5xx answers to fuzzed requests
  serve_recovery_s                    a Serve replica SIGKILLed under load: seconds until two
                                      replicas serve again
  serve_failed_requests               requests that failed in that time (of serve_requests_after_kill)

and reliability.png (faults and inputs per test). `--log FILE` re-aggregates an earlier log
without running the tests; `--update` keeps the records of the tests not run this time from the
existing JSON (e.g. `--update -- tests/test_ragged.py` re-runs only those). Exit status 1 when a fault was not survived, an input not handled, a
row lost or a 5xx seen.
"""
from __future__ import annotations

import argparse
import json
import os
import platform as stdlib_platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def aggregate(records: list[dict]) -> dict:
    """The summary of the per-test JSON lines."""
    def total(key, passed_only=False):
        return sum(r.get(key, 0) for r in records if r["passed"] or not passed_only)

    serve = [r for r in records if "recovery_s" in r]
    return {
        "faults_injected": total("faults"), "faults_survived": total("faults", passed_only=True),
        "bad_inputs_tried": total("tried"), "bad_inputs_handled": total("handled"),
        "pipeline_inputs": total("pipeline_inputs"), "pipeline_inputs_handled": total("pipeline_inputs_handled"),
        "rows_lost": total("rows_lost"), "server_errors_5xx": total("server_errors_5xx"),
        "serve_recovery_s": serve[-1]["recovery_s"] if serve else None,
        "serve_failed_requests": serve[-1]["failed_requests"] if serve else None,
        "serve_requests_after_kill": serve[-1].get("requests_after_kill") if serve else None,
        "tests": records,
    }


def ok(summary: dict) -> bool:
    return (summary["faults_injected"] > 0 and summary["faults_survived"] == summary["faults_injected"]
            and summary["bad_inputs_tried"] > 0 and summary["bad_inputs_handled"] == summary["bad_inputs_tried"]
            and summary.get("pipeline_inputs_handled", 0) == summary.get("pipeline_inputs", 0)
            and summary["rows_lost"] == 0 and summary["server_errors_5xx"] == 0)


def plot(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    faults = [r for r in summary["tests"] if r.get("faults")]
    fuzz = [{**r, "tried": r.get("tried") or r.get("pipeline_inputs", 0),
             "handled": r.get("handled") or r.get("pipeline_inputs_handled", 0)}
            for r in summary["tests"] if r.get("tried") or r.get("pipeline_inputs")]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5))
    names = [r["test"].split("::")[-1].replace("test_", "")[:48] for r in faults]
    a.barh(names, [1] * len(faults), color=["tab:green" if r["passed"] else "tab:red" for r in faults])
    a.set_title(f"faults: {summary['faults_survived']} of {summary['faults_injected']} survived (green)")
    a.set_xticks([])
    a.tick_params(axis="y", labelsize=7)
    names = [r["test"].split("::")[-1].replace("test_", "")[:48] for r in fuzz]
    b.barh(names, [r["tried"] for r in fuzz], color="lightgray", label="tried")
    b.barh(names, [r.get("handled", 0) for r in fuzz], color="tab:blue", height=0.5, label="handled")
    b.set_xscale("log")
    b.set_title(f"bad inputs: {summary['bad_inputs_handled']:,} of {summary['bad_inputs_tried']:,} handled")
    b.tick_params(axis="y", labelsize=7)
    b.legend(loc="lower right")
    if summary["serve_recovery_s"] is not None:
        fig.suptitle(f"Serve replica killed under load: back to 2 replicas in {summary['serve_recovery_s']:.1f} s, "
                     f"{summary['serve_failed_requests']} of {summary['serve_requests_after_kill']} requests failed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reliability.json"), help="result JSON")
    ap.add_argument("--log", help="aggregate this earlier log instead of running the tests")
    ap.add_argument("--update", action="store_true",
                    help="merge into the existing --out: its records of tests not run now are kept")
    ap.add_argument("pytest_args", nargs="*", help="more pytest arguments, after `--` (e.g. -k serve)")
    args = ap.parse_args()
    start = time.time()
    if args.log:
        log = Path(args.log)
    else:
        log = Path(tempfile.mkdtemp()) / "reliability.jsonl"
        cmd = [sys.executable, "-m", "pytest", "-m", "fault or fuzz", "-p", "no:cacheprovider", "-q", *args.pytest_args]
        print("running:", " ".join(cmd), f"(log: {log})", flush=True)
        subprocess.run(cmd, cwd=ROOT, env={**os.environ, "DISTILLERY_RELIABILITY_LOG": str(log)})
    if not log.exists():
        print(f"{log}: no records: did any fault or fuzz test run?")
        return 1
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    out = Path(args.out)
    if args.update and out.exists():
        fresh = {r["test"] for r in records}
        records = [r for r in json.loads(out.read_text())["tests"] if r["test"] not in fresh] + records
    summary = aggregate(records)
    summary["machine"] = {"cpus": os.cpu_count(), "python": stdlib_platform.python_version()}
    summary["wall_s"] = None if args.log else round(time.time() - start, 1)  # no tests ran: nothing timed
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("tests", "machine")}, indent=2))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0 if ok(summary) else 1


if __name__ == "__main__":
    sys.exit(main())
