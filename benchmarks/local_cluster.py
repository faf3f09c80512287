"""A Ray head started the way cluster.yaml starts one (`ray start`, with its environment), on
loopback with ports and a temp dir of its own, and `serve deploy` of serve/config.yaml against it.

Used by tests/test_job_submit.py, tests/test_serve_deploy.py and benchmarks/serve_load.py
(`serve-deploy`), so that what they measure or check is the cluster path itself, not
`serve.run` in the caller's process.
"""
from __future__ import annotations

import contextlib
import copy
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
SERVE = str(Path(sys.executable).with_name("serve"))


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def cluster_yaml_env() -> dict[str, str]:
    """The `VAR=value` assignments that cluster.yaml's head_start_ray_commands put before `ray start`."""
    spec = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    [start] = [c for c in spec["head_start_ray_commands"] if "ray start" in c]
    words = shlex.split(start.split("ray start")[0].replace(";", " "))
    return dict(w.split("=", 1) for w in words if "=" in w and w.split("=", 1)[0].isupper())


@contextlib.contextmanager
def ray_head(extra_env: dict[str, str] | None = None, num_cpus: int = 2) -> Iterator[tuple[str, dict]]:
    """A Ray head of its own, run with --block and stopped by stopping that one process, so nothing
    else on the machine is touched. Yields (dashboard/job API address, environment for the CLIs)."""
    gcs, dash, client, agent_http, agent_grpc, metrics, runtime_env = free_ports(7)
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths have a length limit
    # Ray 2.60 keeps token auth on: the CLI needs RAY_AUTH_MODE=token to use the cluster's token.
    # The job's `python` is the cluster's: here, this virtualenv's (on a real cluster, the image's).
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_ADDRESS": "", **(extra_env or {}),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}", f"--num-cpus={num_cpus}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}", f"--temp-dir={temp}",
         "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True).returncode:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {proc.stdout.read()}")
            if time.monotonic() > deadline:
                raise RuntimeError("the head's job API did not come up within 120 s")
            time.sleep(2)
        yield address, env
    finally:
        proc.terminate()  # --block: SIGTERM stops this head's processes, and nothing else
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        shutil.rmtree(temp, ignore_errors=True)


def local_serve_config(bundle: str, port: int, **args) -> dict:
    """serve/config.yaml as it is, but for this machine: the code from this checkout (local://ROOT,
    what cluster.yaml's file_mounts do on a cluster), `bundle` as args.bundle, `port` as the HTTP
    port and `args` merged into the app's args. Autoscaling, resources, host and batching unchanged."""
    config = copy.deepcopy(yaml.safe_load((ROOT / "serve" / "config.yaml").read_text()))
    config["http_options"]["port"] = port
    [app] = config["applications"]
    app["runtime_env"]["working_dir"] = f"local://{ROOT}"
    app["args"].update(bundle=str(bundle), **args)
    return config


def serve_deploy(address: str, env: dict, config: dict, workdir: Path) -> None:
    """`serve deploy` of `config` (written to `workdir`) through the head's dashboard."""
    path = Path(workdir) / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    done = subprocess.run([SERVE, "deploy", "--address", address, str(path)], env=env, capture_output=True,
                          text=True, timeout=120)
    if done.returncode:
        raise RuntimeError(f"serve deploy failed:\n{done.stdout}\n{done.stderr}")
