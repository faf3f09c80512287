"""The cluster path: `serve deploy serve/config.yaml` against a Ray head started the way
cluster.yaml starts one (RAY_SERVE_ENABLE_HA_PROXY=1), so requests reach a replica through HAProxy
and the replica's own HTTP port, with the app's validation and bearer-token check intact."""
from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from distillery.serving.app import HAPROXY_ENV, demo_requests, wait_ready  # noqa: E402
from local_cluster import cluster_yaml_env, free_ports, local_serve_config, ray_head, serve_deploy  # noqa: E402

KEY = "deploy-test-key"


def _listeners(port: int) -> set[str]:
    """Names of the processes listening on TCP `port` (Linux /proc: socket inodes, then their owners)."""
    sockets = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            cols = row.split()
            if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == "0A":  # 0A: LISTEN
                sockets.add(f"socket:[{cols[9]}]")
    names = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in sockets for fd in os.listdir(f"/proc/{pid}/fd")):
                names.add(Path(f"/proc/{pid}/comm").read_text().strip())
        except OSError:  # gone, or not ours
            continue
    return names


def _post(url: str, body: dict, key: str | None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def test_cluster_yaml_starts_ray_with_the_haproxy_ingress_of_distillery_serve():
    assert cluster_yaml_env() == HAPROXY_ENV
    spec = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    starts = [c for c in spec["head_start_ray_commands"] + spec["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all(f"{k}={shlex.quote(v)} " in c for c in starts for k, v in HAPROXY_ENV.items())


@pytest.fixture(scope="module")
def deployed(tiny_bundle, tmp_path_factory):
    """serve/config.yaml deployed on a head started with cluster.yaml's environment, its autoscaling
    held at two replicas (one can then be killed) and DISTILLERY_API_KEY set: the base URL."""
    [port] = free_ports(1)
    config = local_serve_config(tiny_bundle, port)
    config["http_options"]["host"] = "127.0.0.1"  # one node: loopback is enough here
    [app] = config["applications"]
    app["runtime_env"]["env_vars"] = {"DISTILLERY_API_KEY": KEY}
    app["deployments"][0]["autoscaling_config"].update(min_replicas=2, max_replicas=2)
    base = f"http://127.0.0.1:{port}"
    with ray_head(cluster_yaml_env()) as (address, env):
        serve_deploy(address, env, config, tmp_path_factory.mktemp("deploy"))
        wait_ready(base, 240)
        deadline = time.monotonic() + 120
        while len(_replica_pids()) < 2:
            assert time.monotonic() < deadline, "two replicas did not start"
            time.sleep(1)
        yield base


def _replica_pids() -> list[int]:
    """Processes of this deployment's Endpoint replicas: Ray titles them ray::ServeReplica:APP:DEPLOYMENT,
    and only this test's have its API key in their environment (another Ray may serve an app of that name)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if (Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::ServeReplica:distillery:Endpoint")
                    and f"DISTILLERY_API_KEY={KEY}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")):
                pids.append(int(pid))
        except OSError:
            continue
    return pids


RESENDS = 2  # a kill's in-flight request, and a resend HAProxy routed to the dead replica before it noticed
LINUX = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="finds processes and listeners through Linux's /proc")


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.cluster
@LINUX
def test_serve_deploy_of_serve_config_yaml_answers_through_haproxy(deployed, monkeypatch):
    base = deployed
    assert _listeners(int(base.rsplit(":", 1)[1])) == {"haproxy"}  # not Serve's Python proxy

    status, answer = _post(f"{base}/v1/recommend", {"history": ["sku-0"], "k": 3}, key=None)
    assert status == 401 and "API key" in answer["detail"]
    status, answer = _post(f"{base}/v1/ctr", {"history": ["sku-0"], "candidates": "sku-1"}, key=KEY)
    assert status == 422 and "candidates" in json.dumps(answer)

    monkeypatch.setenv("DISTILLERY_API_KEY", KEY)
    answers = {path: ans for path, _, ans in demo_requests(base)}
    assert len(answers["/v1/recommend"]["items"]) == 5
    ctr = answers["/v1/ctr"]
    assert len(ctr["predictions"]) == 2 and ctr["unknown_ids"] == ["not-an-item"]
    assert all(0 < p["probability"] < 1 for p in ctr["predictions"])
    assert [len(p["top"]) for p in answers["/v1/intent"]["predictions"]] == [3, 3]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.fault
@pytest.mark.cluster
@LINUX
def test_a_killed_replica_behind_haproxy_drops_only_its_requests_in_flight(deployed, reliability):
    """Four clients send CTR requests back to back through HAProxy; one of the two replicas' process
    is SIGKILLed. What it had in flight is lost: HAProxy closes those client connections without an
    answer, as on a keep-alive close, or (seldom) answers 500 for them; for a few milliseconds after
    the kill it may route a resend to the dead replica too. A client may safely resend, as any HTTP
    client with retries would: every /v1 endpoint is a pure function of its request. Every other
    request is answered, and every lost one is answered on a resend with a short back-off."""
    import requests

    base, log, lost, stop = deployed, [], [], threading.Event()

    def client(i):
        with requests.Session() as http:
            http.headers["Authorization"] = f"Bearer {KEY}"
            while not stop.is_set():
                # resends (0.05 s, then 0.1 s later) only when the connection closed without an answer
                # or HAProxy answered 5xx in the dead replica's place
                for attempt in range(RESENDS + 1):
                    if attempt:
                        time.sleep(0.05 * attempt)
                    try:
                        r = http.post(f"{base}/v1/ctr", json={"history": [f"sku-{i}"], "candidates": [f"sku-{i + 1}"]},
                                      timeout=30)
                    except requests.ConnectionError as err:
                        lost.append((time.time(), attempt, repr(err)[:120]))
                        ok = False
                        continue
                    if r.status_code >= 500:
                        lost.append((time.time(), attempt, f"HTTP {r.status_code}"))
                        ok = False
                        continue
                    ok = r.status_code == 200 and len(r.json()["predictions"]) == 1
                    break
                log.append((time.time(), ok, attempt))

    clients = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(4)]
    try:
        for c in clients:
            c.start()
        deadline = time.time() + 60
        while sum(ok for _, ok, _ in log) < 200:
            assert time.time() < deadline, "no steady load through HAProxy"
            time.sleep(0.2)
        before = _replica_pids()
        os.kill(before[0], signal.SIGKILL)
        killed_at, recovered_at = time.time(), None
        reliability["faults"] = 1
        while time.time() - killed_at < 120:
            now = _replica_pids()
            if len(now) == 2 and before[0] not in now:
                recovered_at = time.time()
                break
            time.sleep(0.2)
        time.sleep(5)  # load on the new replica too
    finally:
        stop.set()
        for c in clients:
            c.join(timeout=60)
    assert recovered_at, "the killed replica was not replaced within 120 s"
    after = [ok for t, ok, _ in log if t >= killed_at]
    # (seconds after the kill, which try, what the client saw)
    dropped = [(round(t - killed_at, 2), attempt, why) for t, attempt, why in lost]
    in_flight = [d for d in dropped if d[1] == 0]
    reliability.update(recovery_s=round(recovered_at - killed_at, 2), failed_requests=after.count(False),
                       dropped_in_flight=len(in_flight), failed_resends=len(dropped) - len(in_flight),
                       requests_after_kill=len(after), requests=len(log))
    assert all(ok for _, ok, _ in log), \
        f"{after.count(False)} of {len(after)} requests failed after {RESENDS} resends: {dropped}"
    # only what was in flight at the kill (one request per client), and nothing once HAProxy has seen it
    assert len(in_flight) <= len(clients) and all(0 <= t < 1 for t, _, _ in dropped), dropped
