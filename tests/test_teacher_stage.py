"""The teacher stage on a local Ray with a tiny encoder: contract of its outputs, and resume after a kill."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, checkpoint_part
from distillery import runner
from distillery.tasks import SCORE_METRIC
from distillery.models.teacher import load_model
from distillery.models.seqrec import SeqSpec
from distillery.stages.teacher import evaluate
from distillery.teaching.grid import SequencePart, Trained, choose_dropouts, choose_members, member_name
from distillery.training import Best
from distillery.teaching.sequence import SequenceTasks

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_local")]

METRIC_NAMES = {"recommendation": {"hr@10", "ndcg@10", "mrr"}, "ctr": {"auc", "gauc", "logloss"},
                "intent": {"accuracy", "macro_f1"}}


@pytest.mark.slow
@pytest.mark.fault
def test_teacher_resumes_after_a_kill(prepared, tiny_bert, capfd, reliability, tmp_path):
    """The whole run is killed while the sequence teacher trains; re-run, it keeps the finished SASRec
    baseline, resumes the member from its checkpoint and validates the same epochs."""
    import shutil

    import ray

    cfg, run_dir, _ = prepared
    run_dir = tmp_path / "run"
    shutil.copytree(prepared[1] / "prepare", run_dir / "prepare")
    # 40 epochs of ~0.1 s, none stopped early: the member still trains 2 s after its first checkpoint
    seq = {"dims": [16], "epochs": 40, "eval_every": 2, "patience": 100}
    overrides = [f"teacher.model={tiny_bert}", "teacher.epochs=2", "teacher.patience=5", "teacher.cpus_per_worker=1",
                 "teacher.sasrec.dims=[16]", "teacher.sasrec.dropouts=[0.2]",
                 *[f"teacher.sequence.{k}={v}" for k, v in seq.items()]]
    cfg = cfg.model_copy(update={"run_dir": str(run_dir), "teacher": cfg.teacher.model_copy(update={
        "model": tiny_bert, "epochs": 2, "patience": 5, "cpus_per_worker": 1.0,
        "sequence": cfg.teacher.sequence.model_copy(update=seq),
        "sasrec": cfg.teacher.sasrec.model_copy(update={"dims": [16], "dropouts": [0.2]})})})
    argv = [sys.executable, "-m", "distillery.cli", "run", str(ROOT / "configs" / "demo.yaml"), "--stages", "teacher",
            f"run_dir={run_dir}", "data.synthetic.users=150", "data.synthetic.items=80",
            "data.synthetic.sessions_per_user=10", "data.user_buckets=4", "tasks.intent.min_class_count=3", *overrides]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    # the SASRec baseline trains first in the same Train run: wait for a checkpoint of the member
    ckpts = run_dir / "teacher" / "ray_train" / "teacher"
    deadline = time.time() + 300
    while time.time() < deadline and "teacher-d16-p0.5" not in map(checkpoint_part, ckpts.glob("checkpoint_*")):
        assert proc.poll() is None, "the teacher run ended before the member's first checkpoint"
        time.sleep(0.5)
    time.sleep(2)  # let the checkpoint bookkeeping land
    os.killpg(proc.pid, signal.SIGKILL)  # the whole run dies mid-training
    proc.wait()
    reliability["faults"] = 1
    assert not (run_dir / "teacher" / "manifest.json").exists()
    assert (run_dir / "teacher" / "sasrec" / "sasrec-d16-p0.2" / "history.json").exists()

    capfd.readouterr()
    runner.run(cfg, ["teacher"])
    out = capfd.readouterr().out  # fd-level: progress lines go to the process's own stdout (progress.say)
    assert "resuming an interrupted run" in out and "sasrec-d16-p0.2: already trained, kept" in out
    history = json.loads((run_dir / "teacher" / "members" / "teacher-d16-p0.5" / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, 40, 2))  # each validation once, across the kill
    # the member resumed from its checkpoint (a restore is counted in every later validation), not from scratch
    restarts = [h["restarts"] for h in history]
    assert restarts[0] == 0 and restarts[-1] == 1 and restarts == sorted(restarts)
    assert not (run_dir / "teacher" / "ray_train").exists()
    model, tok, spec = load_model(str(run_dir / "teacher" / "model"))
    metrics = json.loads((run_dir / "teacher" / "metrics.json").read_text())
    again = evaluate(model, tok, str(run_dir / "prepare"), "valid", spec.tasks, cfg.teacher.max_length, seed=cfg.seed)
    for task, metric in SCORE_METRIC.items():
        assert again[task][metric] == pytest.approx(metrics["valid"][task][metric], abs=1e-6)


def test_teacher_stage_trains_the_sequence_teacher_the_sasrec_grid_and_the_encoder(prepared, tiny_bert, capsys):
    """The stage's contract on tiny data: the SASRec baseline is a grid chosen on validation and
    reported beside popularity and TF-IDF; the teacher's members are two seeds of the best dropout
    per width of their grid; the assembled teacher reproduces its reported metrics."""
    cfg, run_dir, _ = prepared
    cfg = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={
        "model": tiny_bert, "epochs": 2, "patience": 5, "cpus_per_worker": 1.0,
        "sequence": cfg.teacher.sequence.model_copy(update={"dims": [16, 24], "dropouts": [0.1, 0.5], "epochs": 4,
                                                             "eval_every": 2, "patience": 3, "members": 2}),
        "sasrec": cfg.teacher.sasrec.model_copy(update={"dims": [16], "dropouts": [0.1, 0.5]})})})
    m = runner.run(cfg, ["teacher"])["teacher"]
    out = capsys.readouterr().out
    assert "SASRec baseline chosen on validation ndcg@10" in out
    metrics = json.loads((run_dir / "teacher" / "metrics.json").read_text())
    for task, names in METRIC_NAMES.items():
        assert names <= set(metrics["test"][task]) and names <= set(metrics["valid"][task])
    assert set(metrics["baselines"]["recommendation"]) == {"popularity", "sasrec"}
    assert set(metrics["baselines"]["ctr"]) == {"popularity", "sasrec"}
    assert set(metrics["baselines"]["intent"]) == {"tfidf_logreg"}
    grid = {r["name"]: r for r in metrics["sasrec_grid"]}
    assert set(grid) == {"sasrec-d16-p0.1", "sasrec-d16-p0.5"}
    best = max(grid.values(), key=lambda r: r["valid"]["recommendation"]["ndcg@10"])
    assert metrics["sasrec_chosen"] == best["name"] and grid[best["name"]]["spec"]["text_dim"] == 0
    for r in grid.values():  # validated every 2 epochs, at most 4
        assert r["epochs_run"] in (2, 4) and r["best_epoch"] in (2, 4)
    assert (run_dir / "teacher" / "item_text.safetensors").exists() and not (run_dir / "teacher" / "ray_train").exists()
    assert m["counts"]["params"] > m["counts"]["sequence_params"] > 0

    model, tok, spec = load_model(str(run_dir / "teacher" / "model"))
    teacher_grid = {r["name"]: r for r in metrics["teacher_grid"]}
    members = []
    for d in (16, 24):  # per width, the dropout with the better validation score, then its second seed
        runs = [teacher_grid[f"teacher-d{d}-p{p}-s0"] for p in (0.1, 0.5)]
        p = max(runs, key=lambda r: r["valid"]["recommendation"]["ndcg@10"])["spec"]["dropout"]
        members += [f"teacher-d{d}-p{p:g}-s0", f"teacher-d{d}-p{p:g}-s1"]
    assert set(teacher_grid) == {f"teacher-d{d}-p{p}-s0" for d in (16, 24) for p in (0.1, 0.5)} | set(members)
    assert metrics["teacher_members"] == members and len(metrics["members_test"]) == 4
    assert [s.dim for s in spec.sequences] == [16, 16, 24, 24] and {s.text_dim for s in spec.sequences} == {32}
    assert [teacher_grid[n]["spec"] for n in metrics["teacher_members"]] == [s.to_json() for s in spec.sequences]
    again = evaluate(model, tok, str(run_dir / "prepare"), "valid", spec.tasks, cfg.teacher.max_length, seed=cfg.seed)
    for task, metric in SCORE_METRIC.items():
        assert again[task][metric] == pytest.approx(metrics["valid"][task][metric], abs=1e-6)



def test_the_teacher_keeps_per_width_the_dropout_best_on_validation_and_every_seed_of_it():
    def row(dim, p, seed, score):
        spec = SeqSpec(n_items=10, dim=dim, layers=1, heads=1, dropout=p, max_history=5)
        part = SequencePart(member_name(dim, p, seed, 2), "unused", spec, SequenceTasks(next_item="recommendation"),
                            ctr_head=True, seed=seed, seed_index=seed)
        return Trained(part, Best({}, score, 1, 1))

    # the grid: one seed per (width, dropout); the second seeds exist only at the chosen dropouts
    grid = [row(64, 0.3, 0, 0.10), row(64, 0.5, 0, 0.07), row(128, 0.3, 0, 0.05), row(128, 0.5, 0, 0.06),
            row(128, 0.5, 1, 0.01), row(64, 0.3, 1, 0.02)]
    assert choose_dropouts(grid) == {64: 0.3, 128: 0.5}
    # a weak second seed does not move the choice, and is still a member (in width, then seed order)
    assert [r.name for r in choose_members(grid)] == ["teacher-d64-p0.3-s0", "teacher-d64-p0.3-s1",
                                                         "teacher-d128-p0.5-s0", "teacher-d128-p0.5-s1"]
    assert member_name(64, 0.3, 0, 1) == "teacher-d64-p0.3"


def test_stage_order_needs_prepare(tmp_path, tiny_config):
    from distillery.errors import StageError

    with pytest.raises(StageError, match="needs the output of prepare"):
        runner.run(tiny_config(), ["teacher"])
    # every missing stage is named, in pipeline order, so that the suggested command runs
    with pytest.raises(StageError, match="needs the output of prepare, teacher, label in .*: run with "
                                         "--stages prepare,teacher,label,distill"):
        runner.run(tiny_config(), ["distill"])
