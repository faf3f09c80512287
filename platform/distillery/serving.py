"""Ray Serve: the FastAPI ingress and the batched model, in one deployment or two.

    HTTP -> Serve proxy -> Endpoint (api.create_app: validation, auth, body limit)
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
import signal
import sys
import threading
import time
import urllib.request
from typing import Any, Callable

from ray import serve

from . import api
from .config import ServeConfig

APP_NAME = "distillery"


class AppArgs(ServeConfig):
    """Typed args of the Serve application (`args:` in serve/config.yaml): the bundle, and the
    serve section's settings with their defaults from `ServeConfig`."""

    bundle: str


class Batched:
    """`api.Backend` over a `service.Service`, whose task calls wait up to `batch_wait_timeout_s`
    for company and run as one batch (`@serve.batch`, in whichever Serve replica holds this object;
    the decorator's sizes are replaced per instance from the config)."""

    def __init__(self, service, max_batch_size: int, batch_wait_timeout_s: float):
        self.service = service
        for method in (self.recommend, self.ctr, self.intent):
            method.set_max_batch_size(max_batch_size)
            method.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch
    async def recommend(self, requests: list[dict]) -> list[dict]:
        return self.service.recommend(requests)

    @serve.batch
    async def ctr(self, requests: list[dict]) -> list[dict]:
        return self.service.ctr(requests)

    @serve.batch
    async def intent(self, requests: list[dict]) -> list[dict]:
        return self.service.intent(requests)

    async def items(self, limit: int, offset: int) -> dict:
        return self.service.items(limit, offset)

    async def card(self) -> dict:
        return self.service.card


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

    async def intent(self, request: dict) -> dict:
        return await self.batched.intent(request)

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

    async def intent(self, request: dict) -> dict:
        return await self.handle.intent.remote(request)

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


def build_app(args: AppArgs | dict, load: Callable[[], Any] | None = None):
    """The Serve application for `args.bundle` (or for what `load` returns): one `Endpoint`
    deployment, or with `args.split` an `Endpoint` in front of a `Model` deployment. Replica counts
    and resources here are the local defaults; serve/config.yaml overrides them on a cluster."""
    from .service import Service

    args = args if isinstance(args, AppArgs) else AppArgs(**args)
    load = load or functools.partial(Service.from_bundle, args.bundle)
    batching = (args.max_batch_size, args.batch_wait_timeout_s, args.threads)
    # a replica holds a full batch in flight and one more filling behind it
    model_options = {"ray_actor_options": {"num_cpus": args.model_cpus}, "max_ongoing_requests": 2 * args.max_batch_size}
    if not args.split:
        return Endpoint.options(num_replicas=args.replicas, **model_options).bind(load, args.max_body_bytes, *batching)
    model = Model.options(num_replicas=args.replicas, **model_options).bind(load, *batching)
    return Endpoint.options(ray_actor_options={"num_cpus": args.ingress_cpus},
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
    calls = [("/v1/items?limit=5", None), ("/v1/model", None),
             ("/v1/recommend", {"history": ids[:3], "k": 5, "explain": True}),
             ("/v1/ctr", {"history": ids[:3], "candidates": ids[3:] + ["not-an-item"], "explain": True}),
             ("/v1/intent", {"texts": ["toner cartridge for a laser printer", "wireless earbuds"], "explain": True})]
    return [(path, body, catalogue if path.startswith("/v1/items") else _get(base + path, body)) for path, body in calls]


def run(bundle_path: str, cfg: ServeConfig, *, demo: bool = False) -> int:
    """Serve `bundle_path` on a local Ray until SIGINT/SIGTERM (or, with `demo`, until one request of
    each kind is answered), then shut Serve and Ray down."""
    import ray

    from . import bundle

    manifest = bundle.verify(bundle_path)  # fail before starting Ray, naming the bad files
    stop = threading.Event()
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore"}})
    # after ray.init, which installs a SIGTERM handler that aborts the process
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        base = f"http://{'127.0.0.1' if cfg.host in ('0.0.0.0', '::') else cfg.host}:{cfg.port}"
        serve.run(build_app(AppArgs(bundle=os.path.abspath(bundle_path) if "://" not in bundle_path else bundle_path,
                                    **cfg.model_dump())),
                  name=APP_NAME, route_prefix="/", blocking=False)
        health = wait_ready(base)
        print(f"serving {bundle_path} (model {health['model']}, {len(manifest['files'])} files verified) "
                     f"at {base}; OpenAPI docs at {base}/docs. Ctrl-C or SIGTERM stops it.", flush=True)
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


def _short(answer: dict, width: int = 1500) -> str:
    if "metrics" in answer:  # the model card: its identity, not every metric
        answer = {k: answer[k] for k in ("version", "created", "variant", "weights", "catalogue_size")}
    text = json.dumps(answer, ensure_ascii=False)
    return "  " + (text if len(text) <= width else text[:width] + " ...")
