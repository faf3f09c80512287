"""Where a request's time goes in the served app: py-spy on the Serve proxy and the Endpoint replica
while closed-loop clients load one endpoint, and each process's CPU time per request.

    python benchmarks/serve_profile.py [--bundle runs/office/bundle] [--endpoint ctr] [--clients 8]
                                       [--seconds 15] [--modes proxy,direct,haproxy] [--serve-logs]

Modes (each on a fresh local Ray, one after another; the same client and loopback):
- proxy:   Ray Serve's Python proxy on --port in front of the replica (Ray's default);
- direct:  direct ingress (`RAY_SERVE_ENABLE_DIRECT_INGRESS=1`): the client on the replica's own port;
- haproxy: `RAY_SERVE_ENABLE_HA_PROXY=1`: HAProxy on --port in front of the replicas' own ports.
`--serve-logs` keeps Serve's per-request access log and INFO level (distillery's default is off).

Each sampled Python stack is put in the first matching part (table `PARTS`, most specific first):
logging, metrics, the model (service + runtime + torch), response validation and JSON
encoding, request parsing and validation, `@serve.batch`, HTTP (uvicorn/h11/starlette/FastAPI
routing), Serve's proxy routing, Serve's replica bookkeeping, Ray's actor-call machinery,
the asyncio loop, other. Stacks are on-CPU samples only (py-spy without --idle); native code
(pydantic-core, torch kernels) counts under the Python frame that called it.

Writes benchmarks/results/serve_profile.json and serve_profile.png. Needs `py-spy` on PATH
(`pip install py-spy`) and ptrace rights over the Ray workers (same user, or root).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(0, str(ROOT / "benchmarks"))

PARTS = [  # (part, regex over the whole collapsed stack), most specific first
    ("logging", r"logging/__init__\.py|logging/handlers\.py|serve/_private/logging_utils\.py|access_log_msg"),
    ("metrics", r"metrics_utils\.py|ray/util/metrics\.py|_record_|opentelemetry|prometheus"),
    ("model (service, runtime, torch)", r"distillery/service\.py|distillery/runtime\.py|torch/"),
    ("response validation + JSON encoding", r"serialize_response|jsonable_encoder|JSONResponse|json/encoder\.py"),
    ("request parsing + validation", r"request_body_to_args|solve_dependencies|_validate_value|model_validate|json/decoder"),
    ("@serve.batch", r"serve/batching\.py"),
    ("HTTP (uvicorn, h11, starlette, FastAPI)", r"uvicorn/|/h11/|httptools|starlette/|fastapi/"),
    ("Serve proxy routing", r"serve/_private/(proxy|proxy_router|router|request_router|http_util|replica_result|handle)"),
    ("Serve replica bookkeeping", r"serve/_private/replica\.py|serve/_private/(utils|common)\.py"),
    ("Ray actor calls (core worker, gRPC)", r"ray/_raylet|ray/_private/|ray/actor\.py|grpc"),
    ("asyncio loop", r"asyncio/"),
    # a thread whose innermost Python frame is the thread machinery runs compiled code (Ray's
    # Cython core worker, gRPC) or waits in it; py-spy without --native cannot tell which
    ("native code or waiting in a thread (Ray core worker, gRPC)", r"^$|threading\.py:\d+\)$|thread\.py:\d+\)$"),
]
MODES = ("proxy", "direct", "haproxy")


def mode_env(mode: str) -> dict[str, str]:
    return {"proxy": {}, "direct": {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"},
            "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1"}}[mode]


def classify(stack: str) -> str:
    for part, pattern in PARTS:
        if re.search(pattern, stack.strip()):
            return part
    return "other"


def read_collapsed(path: Path) -> dict[str, int]:
    """py-spy's raw output (`frame;frame;... count` per line) -> samples per part."""
    parts: dict[str, int] = {}
    if not path.exists():
        return parts
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            part = classify(stack)
            parts[part] = parts.get(part, 0) + int(count)
    return parts


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pids(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out if int(p) != os.getpid()]


def profile_mode(mode: str, args, bundle_path: str, bodies: list[dict]) -> dict:
    import ray
    from distillery.serving.app import APP_NAME, AppArgs, build_app, logging_config, spare_port, wait_ready
    from ray import serve
    from serve_load import closed_loop, replica_url

    for k in ("RAY_SERVE_ENABLE_DIRECT_INGRESS", "RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_THROUGHPUT_OPTIMIZED"):
        os.environ.pop(k, None)
    os.environ.update(mode_env(mode))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = spare_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=logging_config(args.serve_logs))
        serve.run(build_app(AppArgs(bundle=bundle_path, access_log=args.serve_logs)), name=APP_NAME, route_prefix="/",
                  blocking=False)
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, 180)
        if mode == "direct":
            base = replica_url()
        procs = {"proxy": pids("ray::ProxyActor"), "replica": pids("ServeReplica:distillery:Endpoint"),
                 "haproxy": pids("haproxy -db -f")}
        tmp = Path(tempfile.mkdtemp())
        asyncio.run(closed_loop(base, args.endpoint, bodies, args.clients, 2.0))  # warm-up
        cpu0 = {k: sum(cpu_seconds(p) for p in v) for k, v in procs.items()}
        spies = [(name, pid, subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--duration",
                                               str(int(args.seconds)), "--rate", "100", "--format", "raw",
                                               "--output", str(tmp / f"{name}-{pid}.txt")],
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                 for name in ("proxy", "replica") for pid in procs[name]]
        result = asyncio.run(closed_loop(base, args.endpoint, bodies, args.clients, args.seconds, warmup=0.0))
        cpu1 = {k: sum(cpu_seconds(p) for p in v) for k, v in procs.items()}
        for _, _, spy in spies:
            spy.wait(60)
        n = max(result["requests"], 1)
        out = {"mode": mode, "load": result,
               "cpu_ms_per_request": {k: round(1000 * (cpu1[k] - cpu0[k]) / n, 3) for k in procs if procs[k]},
               "profiles": {}}
        for name in ("proxy", "replica"):
            samples: dict[str, int] = {}
            for pid in procs[name]:
                for part, c in read_collapsed(tmp / f"{name}-{pid}.txt").items():
                    samples[part] = samples.get(part, 0) + c
            total = sum(samples.values())
            if total:
                out["profiles"][name] = {"samples": total, "share": {k: round(v / total, 4) for k, v in
                                                                      sorted(samples.items(), key=lambda kv: -kv[1])}}
        print(json.dumps({k: out[k] for k in ("mode", "cpu_ms_per_request")}), f"p50 {result['p50_ms']:.1f} ms",
              f"{result['throughput_rps']:.0f} req/s", flush=True)
        for name, prof in out["profiles"].items():
            print(f"  {name}: " + ", ".join(f"{k} {v:.0%}" for k, v in prof["share"].items()), flush=True)
        serve.shutdown()
        return out
    finally:
        ray.shutdown()


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(r["mode"], name, prof) for r in results for name, prof in r["profiles"].items()]
    parts = [p for p, _ in PARTS] + ["other"]
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.5 * len(rows)))
    colors = plt.get_cmap("tab20")(range(len(parts)))
    for i, (mode, name, prof) in enumerate(rows):
        cpu = next(r for r in results if r["mode"] == mode)["cpu_ms_per_request"].get(name, 0.0)
        left = 0.0
        for j, part in enumerate(parts):
            w = prof["share"].get(part, 0.0) * cpu
            ax.barh(i, w, left=left, color=colors[j], label=part if i == 0 else None)
            left += w
    ax.set_yticks(range(len(rows)), [f"{m}: {n}" for m, n, _ in rows])
    ax.set_xlabel("CPU ms per request, split by where py-spy found the process")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default=None, help="bundle to serve (default runs/office/bundle, else runs/demo/bundle)")
    p.add_argument("--endpoint", default="ctr", choices=("recommend", "ctr", "intent", "healthz"),
                   help="endpoint under load (default ctr: 100 candidates over a 20-item history)")
    p.add_argument("--clients", type=int, default=8, help="closed-loop clients (default 8)")
    p.add_argument("--seconds", type=float, default=15.0, help="profiled seconds per mode (default 15)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--serve-logs", action="store_true",
                   help="keep Serve's per-request access log at INFO (as Ray's defaults do)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_profile.json"), help="results JSON")
    args = p.parse_args()
    from serve_load import default_bundle

    if shutil.which("py-spy") is None:
        print("py-spy is not on PATH: pip install py-spy")
        return 2
    bundle_path = args.bundle or default_bundle()
    if bundle_path is None:
        print("no bundle: run `make demo` (runs/demo/bundle) or pass --bundle")
        return 2
    from serve_load import make_requests

    bodies = make_requests(bundle_path, 512, seed=0).get(args.endpoint, [{}])
    results = [profile_mode(m, args, bundle_path, bodies) for m in args.modes.split(",")]
    out = {"bundle": bundle_path, "endpoint": args.endpoint, "clients": args.clients, "seconds": args.seconds,
           "serve_logs": args.serve_logs, "parts": [p for p, _ in PARTS] + ["other"], "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    plot(results, Path(args.out).with_suffix(".png"))
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
