"""The whole pipeline as one Ray job, submitted with `ray job submit` to a cluster started with
`ray start --head` on loopback, with the run directory as a file:// URI."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from local_cluster import RAY, ray_head  # noqa: E402


@pytest.fixture
def head():
    """A Ray head of its own, started as cluster.yaml starts one (`local_cluster.ray_head`)."""
    with ray_head() as (address, env):
        yield address, env


@pytest.mark.integration
@pytest.mark.cluster
def test_the_pipeline_runs_as_one_submitted_job(head, tiny_bert, tmp_path):
    address, env = head
    run_uri = f"file://{tmp_path}/run"
    overrides = [
        f"run_dir={run_uri}", "data.synthetic.users=150", "data.synthetic.items=80",
        "data.synthetic.sessions_per_user=10", "data.user_buckets=4", "tasks.intent.min_class_count=3",
        f"teacher.model={tiny_bert}", "teacher.epochs=1", "teacher.sequence.dims=[16]", "teacher.sequence.epochs=2",
        "teacher.sequence.eval_every=1", "teacher.sasrec.dims=[16]", "teacher.sasrec.dropouts=[0.2]",
        "student.dim=16", "student.text_dim=8", "student.ngram_buckets=512",
        "distill.epochs=1", "distill.steps_per_epoch=4", "distill.batch_size=64",
        "tune.num_samples=2", "tune.epochs=1", "tune.grace_period=1",
        "compress.unit_keep=[0.5]", "compress.finetune_steps=5", "compress.latency_requests=10", "report.latency_requests=10"]
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
    from distillery.serving import bundle

    bundle.verify(str(run / "bundle"))
    assert "[report]" in logs
