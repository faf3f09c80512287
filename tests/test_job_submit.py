"""The whole pipeline as one Ray job, submitted with `ray job submit` to a cluster started with
`ray start --head` on loopback, with the run directory as a file:// URI."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture
def head():
    """A Ray head of its own (its own ports and temp dir, so the test session's Ray is untouched),
    run with --block and stopped by stopping that one process: only what this test started.
    Yields the job API address."""
    gcs, dash, client, agent_http, agent_grpc, metrics, runtime_env = _ports(7)
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths have a length limit
    # Ray 2.60 keeps token auth on: the CLI needs RAY_AUTH_MODE=token to use the cluster's token
    # the job's `python` is the cluster's: here, this virtualenv's (on a real cluster, the image's)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_ADDRESS": "",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=2",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}", f"--temp-dir={temp}",
         "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True).returncode:
            assert proc.poll() is None, f"ray start exited: {proc.stdout.read()}"
            assert time.monotonic() < deadline, "the head's job API did not come up"
            time.sleep(2)
        yield address, env
    finally:
        proc.terminate()  # --block: SIGTERM stops this head's processes, and nothing else
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.integration
@pytest.mark.cluster
def test_the_pipeline_runs_as_one_submitted_job(head, tiny_bert, tmp_path):
    address, env = head
    run_uri = f"file://{tmp_path}/run"
    overrides = [
        f"run_dir={run_uri}", "data.synthetic.users=150", "data.synthetic.items=80",
        "data.synthetic.sessions_per_user=10", "data.user_buckets=4", "tasks.intent.min_class_count=3",
        f"teacher.model={tiny_bert}", "teacher.epochs=1", "teacher.sequence.dim=16", "teacher.sequence.epochs=2",
        "teacher.sequence.eval_every=1", "teacher.sasrec.dims=[16]", "teacher.sasrec.dropouts=[0.2]",
        "student.dim=16", "student.text_dim=8", "student.ngram_buckets=512",
        "distill.epochs=1", "distill.steps_per_epoch=4", "distill.batch_size=64",
        "tune.num_samples=2", "tune.epochs=1", "tune.grace_period=1",
        "compress.sparsities=[0.5]", "compress.finetune_steps=5", "report.latency_requests=10"]
    submit = subprocess.run(
        [RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--no-wait", "--",
         "python", "jobs/pipeline.py", "--config", "configs/demo.yaml", *overrides],
        env=env, capture_output=True, text=True, timeout=300)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    job_id = re.search(r"raysubmit_\w+", submit.stdout + submit.stderr).group(0)
    deadline, status = time.monotonic() + 900, ""
    while time.monotonic() < deadline:
        done = subprocess.run([RAY, "job", "status", "--address", address, job_id], env=env,
                              capture_output=True, text=True)
        status = done.stdout + done.stderr  # the CLI logs its status lines to stderr
        if re.search(r"succeeded|failed|stopped", status, re.IGNORECASE):
            break
        time.sleep(5)
    logs = subprocess.run([RAY, "job", "logs", "--address", address, job_id], env=env,
                          capture_output=True, text=True).stdout
    assert re.search(r"succeeded", status, re.IGNORECASE), f"{status}\n--- job logs (tail) ---\n{logs[-6000:]}"

    run = tmp_path / "run"
    for stage in ("prepare", "teacher", "label", "distill", "tune", "compress", "report"):
        manifest = json.loads((run / stage / "manifest.json").read_text())
        assert manifest.get("status", "complete") == "complete", stage
    assert (run / "report" / "report.json").exists() and (run / "bundle" / "manifest.json").exists()
    from distillery import bundle

    bundle.verify(str(run / "bundle"))
    assert "[report]" in logs
