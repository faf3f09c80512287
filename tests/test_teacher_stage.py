"""The teacher stage on a local Ray with a tiny encoder: contract of its outputs, and resume after a kill."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from distillery import runner
from distillery.teacher import SCORE_METRIC, evaluate, load_model

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_local")]

METRIC_NAMES = {"recommendation": {"hr@10", "ndcg@10", "mrr"}, "ctr": {"auc", "gauc", "logloss"},
                "intent": {"accuracy", "macro_f1"}}


@pytest.mark.slow
@pytest.mark.fault
def test_teacher_trains_resumes_after_a_kill_and_writes_its_metrics(prepared, tiny_bert, capsys, reliability):
    import ray

    cfg, run_dir, _ = prepared
    overrides = [f"teacher.model={tiny_bert}", "teacher.epochs=2", "teacher.patience=5", "teacher.batch_size=64",
                 "teacher.cpus_per_worker=1"]
    cfg = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={
        "model": tiny_bert, "epochs": 2, "patience": 5, "batch_size": 64, "cpus_per_worker": 1.0})})
    argv = [sys.executable, "-m", "distillery.cli", "run", str(ROOT / "configs" / "demo.yaml"), "--stages", "teacher",
            f"run_dir={run_dir}", "data.synthetic.users=150", "data.synthetic.items=80",
            "data.synthetic.sessions_per_user=10", "data.user_buckets=4", "tasks.intent.min_class_count=3", *overrides]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpts = run_dir / "teacher" / "ray_train" / "teacher"
    deadline = time.time() + 240
    while time.time() < deadline and not list(ckpts.glob("checkpoint_*")):
        assert proc.poll() is None, "the teacher run ended before its first checkpoint"
        time.sleep(1)
    time.sleep(2)  # let the checkpoint bookkeeping land
    os.killpg(proc.pid, signal.SIGKILL)  # the whole run dies mid-training
    proc.wait()
    reliability["faults"] = 1
    assert not (run_dir / "teacher" / "manifest.json").exists()

    m = runner.run(cfg, ["teacher"])["teacher"]
    out = capsys.readouterr().out
    assert "resuming an interrupted run" in out
    history = json.loads((run_dir / "teacher" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1]  # epoch 1 came from the checkpoint, not a second run of it

    metrics = json.loads((run_dir / "teacher" / "metrics.json").read_text())
    assert set(metrics) >= {"valid", "test", "baselines"}
    for task, names in METRIC_NAMES.items():
        assert names <= set(metrics["test"][task]) and names <= set(metrics["valid"][task])
    assert set(metrics["baselines"]) == {"recommendation", "ctr", "intent"}
    assert "popularity" in metrics["baselines"]["recommendation"] and "tfidf_logreg" in metrics["baselines"]["intent"]
    assert m["counts"]["params"] > 0 and not (run_dir / "teacher" / "ray_train").exists()

    # the saved best model reproduces its reported validation metrics (safetensors round trip)
    model, tok, meta = load_model(str(run_dir / "teacher" / "model"))
    again = evaluate(model, tok, str(run_dir / "prepare"), "valid", meta["tasks"], cfg.teacher.max_length, seed=cfg.seed)
    best = max(history, key=lambda h: h["score"])
    for task, metric in SCORE_METRIC.items():
        assert again[task][metric] == pytest.approx(best["valid"][task][metric], abs=1e-4)


def test_stage_order_needs_prepare(tmp_path, tiny_config):
    from distillery.errors import StageError

    with pytest.raises(StageError, match="needs the prepare stage"):
        runner.run(tiny_config(), ["teacher"])
