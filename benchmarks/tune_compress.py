"""The sweep on real data: a Ray Tune sweep on the Amazon 2014 Office data, then the compress stage
over its winner (the compression itself, variant by variant: `benchmarks/compress.py`).

    python benchmarks/tune_compress.py [--data DIR] [--work runs/office/seed0] [--trials 16] [key=value ...]

Reuses WORK's prepare, teacher, label and distill stages (runs them when missing; the default is
the seed-0 run directory that `benchmarks/quality.py` leaves, whose stages are the same). The
sweep's first trial runs the config's defaults, so "does the best trial beat the defaults" is
answered at the same per-trial budget. Writes benchmarks/results/tune_compress.json and
tune_office.png (score against T and a per task).

Target: the best trial beats the defaults trial at the same per-trial budget.
"""
from __future__ import annotations

import json
import os
import platform as stdlib_platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

import office  # noqa: E402  (benchmarks/office.py)
from distillery import runner, storage  # noqa: E402
from distillery.layout import RunLayout  # noqa: E402
from distillery.serving import bundle  # noqa: E402
from distillery.stages import compress, tune  # noqa: E402


def main() -> int:
    p = office.parser(__doc__, work=str(ROOT / "runs" / "office" / "seed0"),
                      work_help="run directory (upstream stages reused; default: quality.py's seed 0)",
                      out="tune_compress.json")
    p.add_argument("--trials", type=int, default=16, help="trials in the sweep (default 16)")
    p.add_argument("--epochs", type=int, default=6, help="epoch budget per trial (default 6; ASHA stops the weaker)")
    args = p.parse_args()
    # ASHA from epoch 2 (the config's default): on Office the first epoch's score says how fast a
    # trial starts, not where it ends, and a grace period of 1 stopped half the trials there
    cfg = office.config(args, args.work, f"tune.num_samples={args.trials}", f"tune.epochs={args.epochs}")
    if cfg is None:
        return 2
    cfg = cfg.model_copy(update={"run_dir": storage.absolute(cfg.run_dir)})
    runner.init_ray()
    runner.run(cfg, ["prepare", "teacher", "label", "distill"])
    layout = RunLayout(cfg.run_dir)

    t0 = time.perf_counter()
    storage.remove(layout.tune.root)
    storage.makedirs(layout.tune.root)
    swept = tune.run(cfg, layout.tune.root)
    sweep_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    storage.remove(layout.compress.root)
    storage.makedirs(layout.compress.root)
    kept = compress.run(cfg, layout.compress.root)
    compress_s = time.perf_counter() - t1
    variants = storage.read_json(layout.compress.variants)
    bundle.verify(layout.bundle)

    best = swept["best"]
    result = {
        "data": args.data, "trials": args.trials, "epochs_per_trial": args.epochs,
        "sweep": {"seconds": round(sweep_s, 1), "failed": swept["counts"]["failed"],
                  "stopped_early": best["stopped_early"], "best_trial": best["trial_id"],
                  "best_valid_score": best["valid_score"], "defaults_trial_score": best["defaults_trial_score"],
                  "gain_over_defaults": best["gain_over_defaults_trial"],
                  "relative_gain_over_defaults": best["relative_gain_over_defaults_trial"],
                  "distill_student_score": best["distill_student_score"], "winner": best["winner"],
                  "best_params": best["params"]},
        "compress": {"seconds": round(compress_s, 1), "kept": kept["chosen"],
                     "variants": {v["name"]: {k: v[k] for k in ("parent", "bytes", "params", "p50_ms", "throughput_b256",
                                                               "drops", "within_budget")} for v in variants}},
        "machine": {"cpus": os.cpu_count(), "platform": stdlib_platform.platform()},
    }
    result["targets"] = {"best_trial_beats_defaults": (best["gain_over_defaults_trial"] or 0) > 0}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    shutil.copyfile(layout.tune.plot, out.with_name("tune_office.png"))
    print(json.dumps({k: result[k] for k in ("sweep", "compress", "targets")}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
