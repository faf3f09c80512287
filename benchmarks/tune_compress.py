"""The sweep and the compression on real data: a Ray Tune sweep on the Amazon 2014 Office data,
then the compress stage, and the 8-bit student against the float32 one it came from.

    python benchmarks/tune_compress.py [--data DIR] [--work runs/office/seed0] [--trials 16] [key=value ...]

Reuses WORK's prepare, teacher, label and distill stages (runs them when missing; the default is
the seed-0 run directory that `benchmarks/quality.py` leaves, whose stages are the same). The
sweep's first trial runs the config's defaults, so "does the best trial beat the defaults" is
answered at the same per-trial budget. Writes benchmarks/results/tune_compress.json and
tune_office.png (score against T and a per task).

Targets (issue 5): the 8-bit variant within 1% of float32 on every task (validation), at least 3x
smaller on disk, at least 1.5x the float32 throughput at batch 256 on CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform as stdlib_platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

from distillery import bundle, compress, report, runner, storage, tune  # noqa: E402
from distillery.config import load_config  # noqa: E402
from distillery.teacher import SCORE_METRIC  # noqa: E402


def main() -> int:
    default_data = Path(os.environ.get("DISTILLERY_SHARED_DATA", ROOT.parent / "shared" / "data"))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(default_data / "amazon14_office_products_lcrec"),
                   help="folder with interactions.parquet and items.parquet (LC-Rec Office in the native contract)")
    p.add_argument("--config", default=str(ROOT / "configs" / "amazon.yaml"), help="run config")
    p.add_argument("--work", default=str(ROOT / "runs" / "office" / "seed0"),
                   help="run directory (upstream stages reused; default: quality.py's seed 0)")
    p.add_argument("--trials", type=int, default=16, help="trials in the sweep (default 16)")
    p.add_argument("--epochs", type=int, default=6, help="epoch budget per trial (default 6; ASHA stops the weaker)")
    p.add_argument("--requests", type=int, default=200, help="requests timed per model for the throughput ratio")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tune_compress.json"), help="results JSON")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = p.parse_args()
    data = Path(args.data)
    if not (data / "interactions.parquet").exists():
        print(f"no Office data at {data}: pass --data or set DISTILLERY_SHARED_DATA")
        return 2
    cfg = load_config(args.config, [f"data.interactions={data / 'interactions.parquet'}",
                                     f"data.items={data / 'items.parquet'}", f"run_dir={args.work}",
                                     f"tune.num_samples={args.trials}", f"tune.epochs={args.epochs}",
                                     "tune.grace_period=1", *args.overrides])
    cfg = cfg.model_copy(update={"run_dir": storage.absolute(cfg.run_dir)})
    runner.init_ray()
    runner.run(cfg, ["prepare", "teacher", "label", "distill"])
    work = Path(cfg.run_dir)

    t0 = time.perf_counter()
    storage.remove(str(work / "tune"))
    storage.makedirs(str(work / "tune"))
    swept = tune.run(cfg, str(work / "tune"))
    sweep_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    storage.remove(str(work / "compress"))
    storage.makedirs(str(work / "compress"))
    kept = compress.run(cfg, str(work / "compress"))
    compress_s = time.perf_counter() - t1
    variants = json.loads((work / "compress" / "variants.json").read_text())
    fp32, int8 = variants[0], next(v for v in variants if v["name"] == "student_int8")

    # throughput side by side in one process: the float32 winner and its 8-bit copy
    model, tok, meta, model_dir = tune.load_winner(cfg.run_dir)
    from distillery import quant, student as S  # noqa: E402
    from safetensors.torch import load_file  # noqa: E402
    q = S.load(model_dir)[0]
    q.load_state_dict(quant.dequantize_state(quant.quantize_state(load_file(os.path.join(model_dir, "model.safetensors")))))
    tasks = [t for t in SCORE_METRIC if t in meta["tasks"]]
    requests = report._requests(str(work / "prepare"), tasks, args.requests, cfg.seed)
    speed = report.measure_latency({"float32": report.student_server(model, tok, meta),
                                    "int8": report.student_server(q, tok, meta)}, requests)
    bundle.verify(str(work / "bundle"))

    best = swept["best"]
    result = {
        "data": str(data), "trials": args.trials, "epochs_per_trial": args.epochs,
        "sweep": {"seconds": round(sweep_s, 1), "failed": swept["counts"]["failed"],
                  "stopped_early": best["stopped_early"], "best_trial": best["trial_id"],
                  "best_valid_score": best["valid_score"], "defaults_trial_score": best["defaults_trial_score"],
                  "gain_over_defaults": best["gain_over_defaults_trial"],
                  "relative_gain_over_defaults": best["relative_gain_over_defaults_trial"],
                  "distill_student_score": best["distill_student_score"], "winner": best["winner"],
                  "best_params": best["params"]},
        "compress": {"seconds": round(compress_s, 1), "kept": kept["chosen"],
                     "variants": {v["name"]: {"bytes": v["bytes"], "drops": v["drops"], "within_budget": v["within_budget"],
                                             "nonzero_2d_weights": v["nonzero_2d_weights"]} for v in variants}},
        "int8_vs_fp32": {
            "bytes": {"float32": fp32["bytes"], "int8": int8["bytes"], "ratio": fp32["bytes"] / int8["bytes"]},
            "valid_relative_drop": int8["drops"],
            "batch256_req_per_s": {k: v["cpu_throughput"]["batch256"] for k, v in speed.items()},
            "batch256_ratio": speed["int8"]["cpu_throughput"]["batch256"] / speed["float32"]["cpu_throughput"]["batch256"],
            "batch1_p50_ms": {k: v["cpu_latency_ms"]["p50"] for k, v in speed.items()}},
        "machine": {"cpus": os.cpu_count(), "platform": stdlib_platform.platform()},
    }
    r = result["int8_vs_fp32"]
    result["targets"] = {"int8_within_1pct_every_task": all(d <= 0.01 for d in r["valid_relative_drop"].values()),
                         "int8_3x_smaller": r["bytes"]["ratio"] >= 3,
                         "int8_1.5x_throughput_b256": r["batch256_ratio"] >= 1.5,
                         "best_trial_beats_defaults": (best["gain_over_defaults_trial"] or 0) > 0}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    shutil.copyfile(work / "tune" / "tune.png", out.with_name("tune_office.png"))
    print(json.dumps({k: result[k] for k in ("sweep", "int8_vs_fp32", "targets")}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
