"""The HTTP endpoint under load: closed-loop clients on loopback against several servers, one after
another in one run.

    python benchmarks/serve_load.py [--bundle runs/office/bundle] [--teacher RUN_DIR/teacher/model]
                                    [--levels 1,8,32,64] [--seconds 4] [--repeats 3] [--servers ...]

Servers (`--servers`, each on a fresh local Ray; `SERVE_SERVERS` below):
- serve-student: the Serve app as `distillery serve` runs it by default (`serving.ingress`: for one
  replica, Ray's direct ingress, the replica answering on the served port itself; Serve's
  per-request access log off);
- serve-deploy: serve/config.yaml as `serve deploy` puts it on a cluster (its autoscaling, resources
  and batching), on a local head started the way cluster.yaml starts one: RAY_SERVE_ENABLE_HA_PROXY=1,
  so HAProxy on the served port in front of the replicas' own ports;
- serve-student-ray-defaults: the same app on Ray's default path, Serve's Python proxy in front and
  its access log on (what this platform served before);
- serve-student-split: the default with the model in its own deployment (ingress -> model);
- serve-student-direct: direct ingress with the client on the replica's port found by scanning;
- bare-student: the same FastAPI app with the same `Service` in one uvicorn process, no Ray, one
  request at a time (the Serve overhead ratio);
- serve-teacher, serve-teacher-ray-defaults, bare-teacher: the fine-tuned teacher behind the very
  same app and `Service` code, its item vectors computed once at load (the student/teacher ratio);
- knob-*: Ray's default path with one Ray Serve setting changed (the ones RAY_SERVE_THROUGHPUT_OPTIMIZED
  bundles, the access log, HAProxy), to see what each buys.
Each server also answers GET /healthz, which calls no model: its floor.

For each server, endpoint (recommend k=10 over a 20-item history; CTR with 100 candidates; intent
with one item title) and concurrency level, `c` clients each send a request as soon as the last one
is answered, for `--seconds` after one second of warm-up, `--repeats` times; the median of each
number is kept. Writes benchmarks/results/serve.json and serve.png.

Targets, /v1/ctr with 100 candidates at 8 clients: the default Serve path within 2x of
bare uvicorn at p50 and 2.5x at p99, >= 3x the 90 req/s of the earlier default; the student
through Serve >= 20x the teacher through Serve on /v1/intent; no failed request.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform as stdlib_platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

from distillery.serving.app import INGRESS_KNOBS, spare_port, wait_ready  # noqa: E402

ENDPOINTS = ("recommend", "ctr", "intent")


# ------------------------------------------------------------------------------ the teacher as a runtime
class TeacherRuntime:
    """The teacher with the methods `service.Service` calls (see `runtime.StudentRuntime`)."""

    def __init__(self, teacher_dir: str, ctr_history: int):
        import torch
        from distillery.models.teacher import load_model

        self.model, self.tokenizer, spec = load_model(teacher_dir)
        self.max_length = spec.max_length
        with torch.inference_mode():
            self.items = self.model.item_vectors()
        self.rec_history = self.model.max_history
        self.ctr_history = ctr_history

    def histories(self, lists, length: int):
        from distillery.serving.runtime import pad

        return pad(lists, length)

    def users(self, history):
        """history [B, L] -> (users [B, sum of the members' widths], no explanation weights)."""
        import torch

        with torch.inference_mode():
            users = [m.seq.user_vectors(history, v) for m, v in zip(self.model.members, self.items)]
            return torch.cat(users, dim=1), torch.zeros(history.shape)

    def _split(self, u):
        """[B, sum of widths] -> each member's [B, D_m] (members may differ in width)."""
        return u.split([v.shape[1] for v in self.items], dim=1)

    def rec_from_users(self, u):
        """[B, sum of widths] -> [B, V]: the members' scores combined as `Teacher.rec_scores` does."""
        import torch
        from distillery.models.teacher import ensemble_scores

        with torch.inference_mode():
            scores = []
            for user, v in zip(self._split(u), self.items):
                s = user @ v.T
                s[:, :2] = float("-inf")
                scores.append(s)
            return ensemble_scores(scores)

    def ctr_from_users(self, u, candidate, slot):
        """[B, sum of widths], candidate ids [B], slots [B] -> [B] logits: the members' mean, as
        `Teacher.ctr_logits`."""
        import torch

        with torch.inference_mode():
            logits = []
            for m, user, v in zip(self.model.members, self._split(u), self.items):
                cand = v[candidate]
                logits.append(m.ctr(user, cand, candidate, slot) if m.ctr is not None else (user * cand).sum(-1))
            return torch.stack(logits).mean(0)

    def text_logits(self, task, texts):
        import torch
        from distillery.models.teacher import text_inputs

        with torch.inference_mode():
            inputs = text_inputs(self.tokenizer, texts, max_length=self.max_length, buckets=self.model.lexical_buckets)
            return self.model.class_logits(task, **inputs)


def teacher_service(teacher_dir: str, bundle_path: str):
    """A `Service` over the teacher, with the bundle's catalogue and labels."""
    from distillery.serving import bundle
    from distillery.serving.service import Service

    b = bundle.load(bundle_path)
    rt = TeacherRuntime(teacher_dir, b.spec.ctr_history)
    return Service(rt, b.items, labels=dict(b.spec.classes),
                   card={"version": "teacher", "created": None, "metrics": {}, "catalogue_size": len(b.items)})


# ------------------------------------------------------------------------------ servers
def default_bundle() -> str | None:
    """runs/office/bundle, else runs/demo/bundle, whichever exists first."""
    return next((str(ROOT / "runs" / r / "bundle") for r in ("office", "demo")
                 if (ROOT / "runs" / r / "bundle" / "manifest.json").exists()), None)


def bare_server(bundle_path: str, port: int, teacher_dir: str | None) -> None:
    """`--bare PORT`: the student (or, with `teacher_dir`, the teacher) in this process under
    uvicorn, no Ray."""
    import torch
    import uvicorn
    from distillery.serving import api
    from distillery.serving.service import Service

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


def measure(name: str, base: str, requests: dict, levels: list[int], seconds: float, repeats: int = 1,
            endpoints: tuple[str, ...] = (*ENDPOINTS, "healthz")) -> dict:
    """{endpoint: [one row per level]}, each number the median of `repeats` runs of the cell
    (healthz: the server's floor, no model call)."""
    out = {}
    for endpoint in endpoints:
        out[endpoint] = []
        for c in levels:
            runs = [asyncio.run(closed_loop(base, endpoint, requests.get(endpoint, [{}]), c, seconds))
                    for _ in range(repeats)]
            r = {"clients": c, **{k: float(np.median([x[k] for x in runs]))
                                  for k in ("p50_ms", "p99_ms", "throughput_rps")},
                 "requests": int(sum(x["requests"] for x in runs)), "errors": int(sum(x["errors"] for x in runs)),
                 "runs": len(runs)}
            out[endpoint].append(r)
            print(f"{name:28s} {endpoint:9s} c={c:3d}: p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  "
                  f"{r['throughput_rps']:8.1f} req/s  errors {r['errors']} (median of {len(runs)})", flush=True)
    return out


def serve_app(load, bundle_path: str, proxy_port: int, split: bool, batch_wait_ms: float | None,
              access_log: bool = False, client_port: int | None = None):
    """The app on this process's Ray, Serve's proxy on `proxy_port`; the base URL on `client_port`
    (default: the proxy's) once it answers."""
    from distillery.serving.app import APP_NAME, AppArgs, build_app, logging_config
    from ray import serve

    serve.start(http_options={"host": "127.0.0.1", "port": proxy_port}, logging_config=logging_config(access_log))
    wait = {} if batch_wait_ms is None else {"batch_wait_timeout_s": batch_wait_ms / 1000}
    serve.run(build_app(AppArgs(bundle=bundle_path, split=split, access_log=access_log, **wait), load=load),
              name=APP_NAME, route_prefix="/", blocking=False)
    base = f"http://127.0.0.1:{client_port or proxy_port}"
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

    endpoints = [e for e in (*ENDPOINTS, "healthz") if e in next(iter(results.values()))]
    fig, axes = plt.subplots(2, len(endpoints), figsize=(4.7 * len(endpoints), 7.5), squeeze=False)
    colors = dict(zip(results, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3))
    for j, endpoint in enumerate(endpoints):
        route = "/healthz" if endpoint == "healthz" else f"/v1/{endpoint}"
        for name, res in results.items():
            rows, color = res[endpoint], colors[name]
            axes[0, j].plot(levels, [r["p50_ms"] for r in rows], "o-", color=color, label=f"{name} p50")
            axes[0, j].plot(levels, [r["p99_ms"] for r in rows], "x--", color=color, alpha=0.5, label=f"{name} p99")
            axes[1, j].plot(levels, [r["throughput_rps"] for r in rows], "o-", color=color, label=name)
        axes[0, j].set(title=f"{route} latency", xlabel="concurrent clients", ylabel="ms", xscale="log",
                       yscale="log")
        axes[1, j].set(title=f"{route} throughput", xlabel="concurrent clients", ylabel="requests/s",
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


# name -> how the Serve app runs: `env` for its fresh local Ray (None: what `distillery serve` sets,
# `serving.ingress`), Serve's access log, the topology, the model, and where the client connects
# ("port": the app's port, through whatever ingress runs there; "replica": the replica's own port)
SERVE_SERVERS = {
    "serve-student": dict(env=None),
    "serve-student-ray-defaults": dict(env={}, access_log=True),
    "serve-student-split": dict(env=None, split=True),
    "serve-student-direct": dict(env={"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}, client="replica"),
    "serve-teacher": dict(env=None, teacher=True),
    "serve-teacher-ray-defaults": dict(env={}, access_log=True, teacher=True),
    # one knob at a time on Ray's default path (the Python proxy, access log on);
    # RAY_SERVE_THROUGHPUT_OPTIMIZED bundles the env ones
    "knob-no-access-log": dict(env={}),
    "knob-user-code-on-replica-loop": dict(env={"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}, access_log=True),
    "knob-router-on-proxy-loop": dict(env={"RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}, access_log=True),
    "knob-grpc": dict(env={"RAY_SERVE_USE_GRPC_BY_DEFAULT": "1", "RAY_SERVE_PROXY_USE_GRPC": "1"}, access_log=True),
    "knob-log-buffer": dict(env={"RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000"}, access_log=True),
    "knob-gc-freeze": dict(env={"RAY_SERVE_FREEZE_GC_ON_STARTUP": "1"}, access_log=True),
    "knob-throughput-optimized": dict(env={"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}, access_log=True),
    "knob-haproxy": dict(env={"RAY_SERVE_ENABLE_HA_PROXY": "1"}, access_log=True),
}
RAY_SERVE_KNOBS = sorted({k for v in SERVE_SERVERS.values() for k in (v["env"] or {})} | set(INGRESS_KNOBS))
DEFAULT_SERVERS = ("bare-student,bare-teacher,serve-student,serve-deploy,serve-student-ray-defaults,serve-student-split,"
                   "serve-teacher")


def run_deployed(bundle_path: str, requests: dict, levels: list[int], seconds: float, repeats: int,
                 endpoints: tuple[str, ...]) -> tuple[dict, dict]:
    """serve/config.yaml through `serve deploy`, on a head of its own started with cluster.yaml's
    environment (`local_cluster`): (results, that environment)."""
    import tempfile

    from local_cluster import cluster_yaml_env, local_serve_config, ray_head, serve_deploy

    env, port = cluster_yaml_env(), spare_port()
    config = local_serve_config(os.path.abspath(bundle_path), port)
    config["http_options"]["host"] = "127.0.0.1"  # one node: loopback is enough here
    with tempfile.TemporaryDirectory() as tmp, ray_head(env) as (address, cli_env):
        serve_deploy(address, cli_env, config, Path(tmp))
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, 240)
        return measure("serve-deploy", base, requests, levels, seconds, repeats, endpoints), env


def run_serve_server(kind: str, bundle_path: str, teacher_dir: str, requests: dict, levels: list[int], seconds: float,
                     repeats: int, endpoints: tuple[str, ...], batch_wait_ms: float | None) -> tuple[dict, dict]:
    """One Serve server on a fresh local Ray (the knobs are read when Ray starts): (results, env used)."""
    import functools

    import ray
    from distillery.config import ServeConfig
    from distillery.serving.app import ingress
    from distillery.serving.service import Service
    from ray import serve

    spec = SERVE_SERVERS[kind]
    port = spare_port()
    way = ingress(ServeConfig(port=port), spare_port) if spec["env"] is None else None
    if way is not None and way.note:
        print(way.note, flush=True)
    env = way.env if way is not None else spec["env"]
    saved = {k: os.environ.pop(k) for k in RAY_SERVE_KNOBS if k in os.environ}
    os.environ.update(env)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        load = (functools.partial(teacher_service, teacher_dir, bundle_path) if spec.get("teacher")
                else functools.partial(Service.from_bundle, bundle_path))
        base = serve_app(load, bundle_path, way.proxy_port if way is not None else port, split=spec.get("split", False),
                         batch_wait_ms=batch_wait_ms, access_log=spec.get("access_log", False), client_port=port)
        if spec.get("client") == "replica":
            base = replica_url()
        results = measure(kind, base, requests, levels, seconds, repeats, endpoints)
        serve.shutdown()
        return results, env
    finally:
        ray.shutdown()
        for k in env:
            os.environ.pop(k, None)
        os.environ.update(saved)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default=None, help="bundle to serve (default runs/office/bundle, else runs/demo/bundle)")
    p.add_argument("--teacher", default=None, help="teacher model folder (default: RUN_DIR/teacher/model of the "
                   "bundle's run)")
    p.add_argument("--levels", default="1,8,32,64", help="concurrent clients, comma-separated (default 1,8,32,64)")
    p.add_argument("--seconds", type=float, default=4.0, help="measured seconds per cell, after 1 s of warm-up")
    p.add_argument("--repeats", type=int, default=3, help="runs of each cell; the median of each number is kept")
    p.add_argument("--endpoints", default="recommend,ctr,intent,healthz", help="endpoints to load, comma-separated")
    p.add_argument("--servers", default=DEFAULT_SERVERS,
                   help="servers to run, one after another: bare-student and bare-teacher (uvicorn, no Ray), "
                        "serve-deploy (serve/config.yaml on a head started like cluster.yaml's), and "
                        "the Serve ones: " + ", ".join(SERVE_SERVERS) + " (serve-student is what `distillery serve` "
                        "runs; *-ray-defaults is Ray's default path, the Python proxy with its access log; knob-* "
                        "change one Ray Serve setting at a time from there)")
    p.add_argument("--batch-wait-ms", type=float, default=None,
                   help="the Serve apps' batch wait (default: the serve config's batch_wait_timeout_s)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve.json"), help="results JSON")
    p.add_argument("--bare", type=int, default=None, help=argparse.SUPPRESS)  # internal: run a bare server
    args = p.parse_args()

    bundle_path = args.bundle or default_bundle()
    if bundle_path is None:
        print("no bundle: run `make demo` (runs/demo/bundle) or pass --bundle")
        return 2
    if args.bare is not None:
        bare_server(bundle_path, args.bare, args.teacher)
        return 0
    config = json.load(open(os.path.join(bundle_path, "config.json")))
    teacher_dir = args.teacher or os.path.join(config.get("run_dir", ""), "teacher", "model")
    levels = [int(c) for c in args.levels.split(",")]
    endpoints = tuple(args.endpoints.split(","))
    if set(endpoints) - {*ENDPOINTS, "healthz"}:
        p.error(f"unknown endpoints {sorted(set(endpoints) - {*ENDPOINTS, 'healthz'})}: choose from "
                f"{', '.join((*ENDPOINTS, 'healthz'))}")
    servers = args.servers.split(",")
    unknown = [s for s in servers if s not in SERVE_SERVERS and s not in ("bare-student", "bare-teacher", "serve-deploy")]
    if unknown:
        p.error(f"unknown servers {unknown}")
    requests = make_requests(bundle_path, 512, seed=0)
    results: dict[str, dict] = {}
    envs: dict[str, dict] = {}

    for kind in servers:
        if kind.startswith("bare-"):
            port = spare_port()
            teacher = ["--teacher", teacher_dir] if kind == "bare-teacher" else []
            proc = subprocess.Popen([sys.executable, __file__, "--bundle", bundle_path, "--bare", str(port), *teacher])
            try:
                wait_ready(f"http://127.0.0.1:{port}", 180)
                results[kind] = measure(kind, f"http://127.0.0.1:{port}", requests, levels, args.seconds,
                                        args.repeats, endpoints)
            finally:
                proc.terminate()
                proc.wait(30)
        elif kind == "serve-deploy":
            results[kind], envs[kind] = run_deployed(bundle_path, requests, levels, args.seconds, args.repeats, endpoints)
        else:
            results[kind], envs[kind] = run_serve_server(kind, bundle_path, teacher_dir, requests, levels, args.seconds,
                                                         args.repeats, endpoints, args.batch_wait_ms)

    def cell(name, endpoint, clients=8):
        return next(r for r in results[name][endpoint] if r["clients"] == clients)

    import pandas as pd

    summary = {}
    if 8 in levels:
        for endpoint in endpoints:
            row = {}
            for name in results:
                if name != "bare-student" and "bare-student" in results and "-teacher" not in name:
                    row[f"{name}_over_bare_p50"] = cell(name, endpoint)["p50_ms"] / cell("bare-student", endpoint)["p50_ms"]
                    row[f"{name}_over_bare_p99"] = cell(name, endpoint)["p99_ms"] / cell("bare-student", endpoint)["p99_ms"]
            for student, teacher in (("serve-student", "serve-teacher"), ("bare-student", "bare-teacher"),
                                     ("serve-student-ray-defaults", "serve-teacher-ray-defaults")):
                if student in results and teacher in results:
                    row[f"{student}_over_{teacher}_throughput"] = (cell(student, endpoint)["throughput_rps"]
                                                                   / cell(teacher, endpoint)["throughput_rps"])
            for name in ("serve-student", "serve-deploy"):
                if name in results and "serve-student-ray-defaults" in results:
                    row[f"{name}_over_ray-defaults_throughput"] = (
                        cell(name, endpoint)["throughput_rps"] / cell("serve-student-ray-defaults", endpoint)["throughput_rps"])
            row["errors"] = {name: cell(name, endpoint)["errors"] for name in results}
            summary[f"{endpoint}_c8"] = row
    out = {"bundle": bundle_path, "teacher": teacher_dir if any("teacher" in n for n in results) else None,
           "catalogue_size": len(pd.read_parquet(os.path.join(bundle_path, "items.parquet"), columns=["idx"])),
           "levels": levels, "seconds_per_cell": args.seconds, "repeats": args.repeats, "ray_env": envs,
           "machine": {"cpus": os.cpu_count(), "python": stdlib_platform.python_version()},
           "targets": {"ctr_c8_serve_over_bare_p50": 2.0, "ctr_c8_serve_over_bare_p99": 2.5,
                       "ctr_c8_throughput_rps_min": 270.0, "intent_c8_serve_student_over_teacher_throughput": 20.0},
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
