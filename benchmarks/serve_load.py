"""The HTTP endpoint under load: closed-loop clients on loopback against three servers, one after
another in one run.

    python benchmarks/serve_load.py [--bundle runs/office/bundle] [--teacher RUN_DIR/teacher/model]
                                    [--levels 1,8,32,64] [--seconds 6]

Servers:
- serve-student: the Ray Serve app as deployed by default (`distillery.serving.build_app`: proxy ->
  one deployment with the FastAPI app and the batched model);
- serve-student-split: the same with the model in its own deployment (proxy -> ingress -> model);
- serve-student-direct: the default app with Ray's direct ingress (RAY_SERVE_THROUGHPUT_OPTIMIZED=1),
  the client on the replica's own HTTP port: no proxy hop, as behind a load balancer;
- bare-student: the same FastAPI app with the same `Service` in one uvicorn process, no Ray
  (the Serve overhead ratio);
- serve-teacher: the fine-tuned teacher behind the very same Serve app and `Service` code, its item
  vectors computed once at load as any sensible teacher server would (the student/teacher ratio);
- bare-teacher: the teacher in the bare uvicorn server (the ratio without Serve's fixed cost).
Each server also answers GET /healthz, which calls no model: its floor.

For each server, endpoint (recommend k=10 over a 20-item history; CTR with 100 candidates; intent
with one item title) and concurrency level, `c` clients each send a request as soon as the last one
is answered, for `--seconds` after one second of warm-up. Records p50/p99 latency and throughput.
Writes benchmarks/results/serve.json and serve.png.

Targets (issue 6), /v1/ctr with 100 candidates at 8 concurrent: p50 <= 10 ms and p99 <= 50 ms;
throughput >= 20x the teacher's; Serve p50 within 2x of bare FastAPI.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform as stdlib_platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

from distillery.serving import wait_ready  # noqa: E402

ENDPOINTS = ("recommend", "ctr", "intent")


# ------------------------------------------------------------------------------ the teacher as a runtime
class TeacherRuntime:
    """The teacher with the methods `service.Service` calls (see `runtime.StudentRuntime`)."""

    def __init__(self, teacher_dir: str, ctr_history: int):
        import torch

        from distillery.teacher import load_model

        self.model, self.tokenizer, meta = load_model(teacher_dir)
        self.max_length = meta.get("max_length", 64)
        with torch.inference_mode():
            self.items = self.model.item_vectors()
        self.rec_history = self.model.max_history
        self.ctr_history = ctr_history

    def histories(self, lists, task="recommendation"):
        from distillery.runtime import pad

        return pad(lists, self.rec_history if task == "recommendation" else self.ctr_history)

    def users(self, history):
        """history [B, L] -> (users [B, members, D], no explanation weights)."""
        import torch

        with torch.inference_mode():
            users = [m.seq.user_vectors(history, v) for m, v in zip(self.model.members, self.items)]
            return torch.stack(users, dim=1), torch.zeros(history.shape)

    def rec_from_users(self, u):
        """[B, members, D] -> [B, V]: the members' mean dot-product score, as `Teacher.rec_scores`."""
        import torch

        with torch.inference_mode():
            scores = torch.einsum("bmd,mvd->bv", u, self.items) / len(self.model.members)
            scores[:, :2] = float("-inf")
            return scores

    def ctr_from_users(self, u, candidate, slot):
        """[B, members, D], candidate ids [B], slots [B] -> [B] logits: the members' mean, as
        `Teacher.ctr_logits`."""
        import torch

        with torch.inference_mode():
            logits = []
            for i, (m, v) in enumerate(zip(self.model.members, self.items)):
                user, cand = u[:, i], v[candidate]
                logits.append(m.ctr(user, cand, candidate, slot) if m.ctr is not None else (user * cand).sum(-1))
            return torch.stack(logits).mean(0)

    def intent_texts(self, texts):
        import torch

        from distillery.teacher_model import text_inputs

        with torch.inference_mode():
            inputs = text_inputs(self.tokenizer, texts, max_length=self.max_length, buckets=self.model.lexical_buckets)
            return self.model.intent_logits(**inputs)


def teacher_service(teacher_dir: str, bundle_path: str):
    """A `Service` over the teacher, with the bundle's catalogue and labels."""
    from distillery import bundle
    from distillery.service import Service

    b = bundle.load(bundle_path)
    rt = TeacherRuntime(teacher_dir, b.config.get("ctr_history", b.config["max_history"]))
    return Service(rt, b.items, labels=b.config["intent_labels"],
                   card={"version": "teacher", "created": None, "metrics": {}, "catalogue_size": len(b.items)})


# ------------------------------------------------------------------------------ servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bare_server(bundle_path: str, port: int, teacher_dir: str | None) -> None:
    """`--bare PORT`: the student (or, with `teacher_dir`, the teacher) in this process under
    uvicorn, no Ray."""
    import torch
    import uvicorn

    from distillery import api
    from distillery.service import Service

    torch.set_num_threads(1)
    # one request at a time, no batching (@serve.batch needs a Serve replica): the plain server a
    # team would write without Ray
    service = teacher_service(teacher_dir, bundle_path) if teacher_dir else Service.from_bundle(bundle_path)
    app = api.create_app(api.LocalBackend(service))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# ------------------------------------------------------------------------------ load
def make_requests(bundle_path: str, n: int, seed: int) -> dict[str, list[dict]]:
    import pandas as pd

    items = pd.read_parquet(os.path.join(bundle_path, "items.parquet"))
    rng = np.random.default_rng(seed)
    ids = items["item_id"].astype(str).to_numpy()
    titles = [t for t in items["title"].fillna("").astype(str) if t.strip()]
    return {"recommend": [{"history": list(rng.choice(ids, 20)), "k": 10} for _ in range(n)],
            "ctr": [{"history": list(rng.choice(ids, 20)), "candidates": list(rng.choice(ids, 100, replace=False))}
                    for _ in range(n)],
            "intent": [{"texts": [titles[i]]} for i in rng.integers(0, len(titles), n)]}


async def closed_loop(base: str, endpoint: str, bodies: list[dict], clients: int, seconds: float,
                      warmup: float = 1.0) -> dict:
    import aiohttp

    payloads = [json.dumps(b).encode() for b in bodies]
    url = f"{base}/healthz" if endpoint == "healthz" else f"{base}/v1/{endpoint}"
    latencies, errors = [], 0
    t_start = time.perf_counter()
    t_measure, t_end = t_start + warmup, t_start + warmup + seconds
    headers = {"Content-Type": "application/json"}

    async def client(k: int, session):
        nonlocal errors
        i = k
        while True:
            t0 = time.perf_counter()
            if t0 >= t_end:
                return
            call = (session.get(url) if endpoint == "healthz"
                    else session.post(url, data=payloads[i % len(payloads)], headers=headers))
            async with call as resp:
                await resp.read()
                ok = resp.status == 200
            t1 = time.perf_counter()
            if t0 >= t_measure:
                latencies.append(t1 - t0)
                errors += not ok
            i += clients

    connector = aiohttp.TCPConnector(limit=clients, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(client(k, session) for k in range(clients)))
    lat = np.array(latencies) * 1000
    return {"clients": clients, "requests": len(lat), "errors": int(errors),
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "throughput_rps": len(lat) / seconds}


def measure(name: str, base: str, requests: dict, levels: list[int], seconds: float) -> dict:
    out = {}
    for endpoint in (*ENDPOINTS, "healthz"):  # healthz: the server's floor, no model call
        out[endpoint] = []
        for c in levels:
            r = asyncio.run(closed_loop(base, endpoint, requests.get(endpoint, [{}]), c, seconds))
            out[endpoint].append(r)
            print(f"{name:14s} {endpoint:9s} c={c:3d}: p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  "
                  f"{r['throughput_rps']:8.1f} req/s  errors {r['errors']}", flush=True)
    return out


def serve_app(load, bundle_path: str, port: int, split: bool, batch_wait_ms: float | None):
    from ray import serve

    from distillery.serving import APP_NAME, AppArgs, build_app

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    wait = {} if batch_wait_ms is None else {"batch_wait_timeout_s": batch_wait_ms / 1000}
    serve.run(build_app(AppArgs(bundle=bundle_path, split=split, **wait), load=load),
              name=APP_NAME, route_prefix="/", blocking=False)
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, 180)
    return base


def replica_url(first: int = 30000, tries: int = 50) -> str:
    """The direct-ingress port of the one Endpoint replica (Ray allocates them upwards from 30000)."""
    import urllib.request

    for port in range(first, first + tries):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
                if resp.status == 200:
                    return f"http://127.0.0.1:{port}"
        except OSError:
            continue
    raise RuntimeError(f"no direct-ingress replica answered on ports {first}-{first + tries - 1}")


def plot(results: dict, levels: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    colors = dict(zip(results, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for j, endpoint in enumerate(ENDPOINTS):
        for name, res in results.items():
            rows, color = res[endpoint], colors[name]
            axes[0, j].plot(levels, [r["p50_ms"] for r in rows], "o-", color=color, label=f"{name} p50")
            axes[0, j].plot(levels, [r["p99_ms"] for r in rows], "x--", color=color, alpha=0.5, label=f"{name} p99")
            axes[1, j].plot(levels, [r["throughput_rps"] for r in rows], "o-", color=color, label=name)
        axes[0, j].set(title=f"/v1/{endpoint} latency", xlabel="concurrent clients", ylabel="ms", xscale="log",
                       yscale="log")
        axes[1, j].set(title=f"/v1/{endpoint} throughput", xlabel="concurrent clients", ylabel="requests/s",
                       xscale="log", yscale="log")
        for ax in axes[:, j]:
            ax.set_xticks(levels, [str(c) for c in levels])
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    axes[1, 0].legend(fontsize=7)
    fig.suptitle("distillery serving on loopback (2 CPUs): closed-loop clients", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default=None, help="bundle to serve (default runs/office/bundle, else runs/demo/bundle)")
    p.add_argument("--teacher", default=None, help="teacher model folder (default: RUN_DIR/teacher/model of the "
                   "bundle's run)")
    p.add_argument("--levels", default="1,8,32,64", help="concurrent clients, comma-separated (default 1,8,32,64)")
    p.add_argument("--seconds", type=float, default=6.0, help="measured seconds per cell, after 1 s of warm-up")
    p.add_argument("--servers",
                   default="bare-student,bare-teacher,serve-student,serve-student-split,serve-student-direct,serve-teacher",
                   help="servers to run: serve-student (one deployment, the default), serve-student-split (ingress "
                        "and model apart), serve-student-direct (Ray's direct ingress: the replica's own port, no "
                        "proxy), serve-teacher, bare-student and bare-teacher (uvicorn, no Ray)")
    p.add_argument("--batch-wait-ms", type=float, default=None,
                   help="the Serve apps' batch wait (default: the serve config's batch_wait_timeout_s)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve.json"), help="results JSON")
    p.add_argument("--bare", type=int, default=None, help=argparse.SUPPRESS)  # internal: run a bare server
    args = p.parse_args()

    bundle_path = args.bundle or next((str(ROOT / "runs" / r / "bundle") for r in ("office", "demo")
                                       if (ROOT / "runs" / r / "bundle" / "manifest.json").exists()), None)
    if bundle_path is None:
        print("no bundle: run `make demo` (runs/demo/bundle) or pass --bundle")
        return 2
    if args.bare is not None:
        bare_server(bundle_path, args.bare, args.teacher)
        return 0
    config = json.load(open(os.path.join(bundle_path, "config.json")))
    teacher_dir = args.teacher or os.path.join(config.get("run_dir", ""), "teacher", "model")
    levels = [int(c) for c in args.levels.split(",")]
    servers = args.servers.split(",")
    requests = make_requests(bundle_path, 512, seed=0)
    results: dict[str, dict] = {}

    for kind in [s for s in servers if s.startswith("bare-")]:
        port = free_port()
        teacher = ["--teacher", teacher_dir] if kind == "bare-teacher" else []
        proc = subprocess.Popen([sys.executable, __file__, "--bundle", bundle_path, "--bare", str(port), *teacher])
        try:
            wait_ready(f"http://127.0.0.1:{port}", 180)
            results[kind] = measure(kind, f"http://127.0.0.1:{port}", requests, levels, args.seconds)
        finally:
            proc.terminate()
            proc.wait(30)

    for kind in [s for s in servers if s.startswith("serve-")]:
        import functools

        import ray
        from ray import serve

        from distillery.service import Service

        # direct ingress: the Endpoint replica answers HTTP on a port of its own, without the proxy
        # hop (what a load balancer in front of replica ports gets). Read by Ray at start: a fresh Ray.
        direct = kind.endswith("-direct")
        os.environ.pop("RAY_SERVE_THROUGHPUT_OPTIMIZED", None)
        if direct:
            os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            load = (functools.partial(teacher_service, teacher_dir, bundle_path) if kind == "serve-teacher"
                    else functools.partial(Service.from_bundle, bundle_path))
            base = serve_app(load, bundle_path, free_port(), split=kind.endswith("-split"),
                             batch_wait_ms=args.batch_wait_ms)
            if direct:
                base = replica_url()
            results[kind] = measure(kind, base, requests, levels, args.seconds)
            serve.shutdown()
        finally:
            ray.shutdown()
            os.environ.pop("RAY_SERVE_THROUGHPUT_OPTIMIZED", None)

    def cell(name, endpoint, clients):
        return next(r for r in results[name][endpoint] if r["clients"] == clients)

    import pandas as pd

    summary = {}
    if 8 in levels and "serve-student" in results:
        s = cell("serve-student", "ctr", 8)
        summary["ctr_c8"] = {"p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"], "throughput_rps": s["throughput_rps"],
                             "target_p50_ms": 10.0, "target_p99_ms": 50.0}
        for endpoint in (*ENDPOINTS, "healthz"):
            row = {}
            if "bare-student" in results:
                row["serve_over_bare_p50"] = cell("serve-student", endpoint, 8)["p50_ms"] / cell("bare-student", endpoint, 8)["p50_ms"]
            for student, teacher in (("serve-student", "serve-teacher"), ("bare-student", "bare-teacher")):
                if student in results and teacher in results:
                    row[f"{student.split('-')[0]}_student_over_teacher_throughput"] = (
                        cell(student, endpoint, 8)["throughput_rps"] / cell(teacher, endpoint, 8)["throughput_rps"])
            if "serve-student-direct" in results:
                row["direct_over_bare_p50"] = (cell("serve-student-direct", endpoint, 8)["p50_ms"]
                                               / cell("bare-student", endpoint, 8)["p50_ms"]) if "bare-student" in results else None
            if "serve-student-split" in results:
                row["split_over_one_deployment_p50"] = (cell("serve-student-split", endpoint, 8)["p50_ms"]
                                                        / cell("serve-student", endpoint, 8)["p50_ms"])
            summary[f"{endpoint}_c8_ratios"] = row
    out = {"bundle": bundle_path, "teacher": teacher_dir if "serve-teacher" in results else None,
           "catalogue_size": len(pd.read_parquet(os.path.join(bundle_path, "items.parquet"), columns=["idx"])),
           "levels": levels, "seconds_per_cell": args.seconds,
           "machine": {"cpus": os.cpu_count(), "python": stdlib_platform.python_version()},
           "targets": {"ctr_c8_p50_ms": 10.0, "ctr_c8_p99_ms": 50.0, "ctr_student_over_teacher_throughput": 20.0,
                       "ctr_serve_over_bare_p50": 2.0},
           "summary": summary, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    if results:
        plot(results, levels, Path(args.out).with_suffix(".png"))
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
