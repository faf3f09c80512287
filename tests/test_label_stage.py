"""The label stage: what each labeler computes, exactly-once output with several workers, and resume
after the job is killed partway."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import ROOT, tiny_teacher_model
from distillery import runner
from distillery.errors import StageError
from distillery.histories import pad_histories
from distillery.models.teacher import load_backbone, text_inputs
from distillery.config import RunConfig
from distillery.stages import label
from distillery.tasks import TASKS, LabelContext
from distillery.tasks.text import label_texts, label_tokens, tokenize_batch


def _ctx(model, tok=None, *, top_k=4, max_history=5, max_length=16) -> LabelContext:
    """A label context for the tiny teacher: histories of `max_history` items, lists of `top_k`."""
    cfg = RunConfig.model_validate({"label": {"top_k": top_k}, "tasks": {"ctr": {"max_history": max_history}},
                                    "teacher": {"max_length": max_length}})
    return LabelContext(cfg=cfg, tokenizer=tok, spec=SimpleNamespace(max_history=max_history),
                        items=model.item_vectors(), device="cpu")


# ------------------------------------------------------------------------------ units
def test_recommendation_labels_are_the_top_k_outside_the_history(tiny_teacher):
    model, _ = tiny_teacher
    hist = [[2, 3, 4], [], [5]]
    batch = pa.table({"history": pa.array(hist, pa.list_(pa.int32())), "item": pa.array([6, 7, 3], pa.int32())})
    out = TASKS["recommendation"].label(model, batch, _ctx(model))
    scores = model.rec_scores(pad_histories(hist, 5))
    top_ids, top_scores = out["top_ids"].to_pylist(), out["top_scores"].to_pylist()
    for i, h in enumerate(hist):
        assert len(top_ids[i]) == 4 and not set(top_ids[i]) & (set(h) | {0, 1})
        assert top_scores[i] == sorted(top_scores[i], reverse=True)
        allowed = [j for j in range(2, 12) if j not in h]
        best = sorted(allowed, key=lambda j: -float(scores[i, j].detach()))[:4]
        assert top_ids[i] == best
        assert out["target_score"][i].as_py() == pytest.approx(float(scores[i, batch["item"][i].as_py()].detach()), abs=1e-5)
    # a catalogue smaller than K gives every real item
    small = TASKS["recommendation"].label(model, batch, _ctx(model, top_k=50))
    assert len(small["top_ids"][1].as_py()) == 10


def test_ctr_and_intent_labels_match_the_model(tiny_teacher):
    model, tok = tiny_teacher
    batch = pa.table({"history": pa.array([[2, 3], None], pa.list_(pa.int32())), "item": pa.array([4, 5], pa.int32()),
                      "slot": pa.array([0, None], pa.int32()), "text": ["red pen", ""]})
    ctr = TASKS["ctr"].label(model, batch, _ctx(model))
    want = model.ctr_logits(pad_histories([[2, 3], []], 5), torch.tensor([4, 5]), torch.tensor([0, -1]))
    assert np.allclose(ctr["logit"].to_numpy(), want.detach().numpy(), atol=1e-5)
    long = pa.table({"text": ["x " * 5000, None]})  # overlong and missing texts are truncated / empty, not fatal
    intent = TASKS["intent"].label(model, long, _ctx(model, tok))
    assert [len(v) for v in intent["logits"].to_pylist()] == [3, 3]


@pytest.mark.parametrize("lexical_dim", [0, 8])
def test_texts_tokenized_by_ray_data_label_like_texts_tokenized_in_the_worker(tiny_bert, lexical_dim):
    backbone, tok = load_backbone(tiny_bert)
    model = tiny_teacher_model(backbone, lexical_dim=lexical_dim).eval()
    texts = ["red gel pen", None, "x " * 500, "Waetrproof bike helmet with mips"]
    batch = pa.table({"example_id": [f"intent:{i}" for i in range(4)], "split": ["train"] * 4, "text": texts})
    tokens = tokenize_batch(batch, tokenizer=tok, max_length=16, buckets=model.lexical_buckets)
    assert tokens.column_names == ["example_id", "split", "input_ids"] + (["bag_ids"] if lexical_dim else [])
    assert max(len(ids) for ids in tokens.column("input_ids").to_pylist()) == 16  # truncated
    got = label_tokens(model, "intent", tokens, pad_id=tok.pad_token_id, device="cpu")["logits"].to_pylist()
    want = label_texts(model, "intent", tok, batch, max_length=16, device="cpu")["logits"].to_pylist()
    assert TASKS["intent"].label(model, tokens, _ctx(model, tok))["logits"].to_pylist() == got  # tokenized rows
    assert np.allclose(np.array(got), np.array(want), atol=1e-5)


def test_part_writer_groups_splits_and_writes_whole_files(tmp_path):
    w = label.PartWriter(str(tmp_path), "ctr", "abc-000", rows_per_file=3)
    for a in range(0, 8, 2):
        w.add(pa.table({"example_id": [f"e{a}", f"e{a + 1}"], "split": ["train", "valid" if a == 4 else "train"],
                        "logit": pa.array([0.0, 1.0], pa.float32()), "fingerprint": pa.array([a, a + 1], pa.int64())},
                       schema=TASKS["ctr"].label_schema))
    w.close()
    train = sorted((tmp_path / "ctr" / "train").glob("part-*.parquet"))
    assert len(train) == 2 and [pq.read_metadata(f).num_rows for f in train] == [4, 3]
    assert pq.read_table(tmp_path / "ctr" / "valid").column("example_id").to_pylist() == ["e5"]
    assert not list(tmp_path.rglob(".*"))  # no temporaries left behind
    assert sorted(label.done_ids(str(tmp_path), "ctr").to_pylist()) == sorted(f"e{i}" for i in range(8))
    assert len(label.done_ids(str(tmp_path), "intent")) == 0


# ------------------------------------------------------------------------------ the stage on Ray
@pytest.fixture(scope="module")
def trained(prepared, tiny_bert, tmp_path_factory):
    """A run dir with the shared prepare output and a tiny untrained teacher saved where the teacher
    stage saves its model (training it is the teacher tests' business, and costs a minute)."""
    from distillery import storage
    from distillery.models import teacher as teacher_model
    from distillery.models.teacher import load_backbone
    from distillery.stages import teacher

    cfg, run_dir, _ = prepared
    new = tmp_path_factory.mktemp("labelrun")
    shutil.copytree(run_dir / "prepare", new / "prepare")
    cfg = cfg.model_copy(update={"run_dir": str(new), "teacher": cfg.teacher.model_copy(update={"model": tiny_bert})})
    backbone, tok = load_backbone(tiny_bert)
    spec = teacher.teacher_spec(cfg, str(new / "prepare"), text_dim=backbone.config.hidden_size)
    torch.manual_seed(0)
    model = teacher_model.build(backbone, spec, torch.randn(spec.n_items, backbone.config.hidden_size))
    teacher_model.save_model(model, tok, spec, str(new / "teacher" / "model"))
    storage.write_json(str(new / "teacher" / "manifest.json"), {"stage": "teacher", "status": "complete"})
    return cfg, new


def _with_label(cfg, **kw):
    return cfg.model_copy(update={"label": cfg.label.model_copy(update=kw)})


def _read(run_dir: Path, task: str) -> pa.Table:
    return pq.read_table(run_dir / "label" / task)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.fault
@pytest.mark.usefixtures("ray_local")
def test_label_resumes_after_a_kill_on_two_workers_and_labels_each_example_once(trained, capsys, reliability):
    """Killed partway on one worker, resumed on two: the finished parts are kept, and every example
    ends up labelled exactly once (the worker count may change on resume: it does not change labels)."""
    import ray
    from distillery.models.teacher import load_model

    cfg, run_dir = trained
    argv = [sys.executable, "-m", "distillery.cli", "run", str(ROOT / "configs" / "demo.yaml"), "--stages", "label",
            "--force", f"run_dir={run_dir}", "label.top_k=5", "label.batch_size=16", "label.rows_per_file=16"]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    shutil.rmtree(run_dir / "label", ignore_errors=True)  # parts of an earlier test must not count below
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ctr = run_dir / "label" / "ctr"
    deadline = time.time() + 180
    while time.time() < deadline and len(list(ctr.rglob("part-*.parquet"))) < 5:
        assert proc.poll() is None, "the label run ended before it was killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    reliability["faults"] = 1
    # the job's workers die with their driver; wait until nothing writes any more
    seen, stable_since = -1, time.time()
    while time.time() - stable_since < 3:
        n = len(list((run_dir / "label").rglob("part-*.parquet")))
        if n != seen:
            seen, stable_since = n, time.time()
        time.sleep(0.2)
    first = {p.name for p in (run_dir / "label").rglob("part-*.parquet")}
    assert first and not (run_dir / "label" / "manifest.json").exists()

    # resumed with texts tokenized by Ray Data (the GPU default) instead of in the worker
    cfg = _with_label(cfg, top_k=5, num_workers=2, cpus_per_worker=0.5, batch_size=32, rows_per_file=5000,
                      tokenize="data", tokenize_cpus=0.5)
    m = runner.run(cfg, ["label"])["label"]
    assert "resuming an interrupted run" in capsys.readouterr().out
    prepared = json.loads((run_dir / "prepare" / "manifest.json").read_text())["examples"]
    assert m["examples"] == prepared and m["workers"] == 2  # verified inside the stage too
    after = {p.name for p in (run_dir / "label").rglob("part-*.parquet")}
    assert first <= after and len(after) > len(first)  # finished parts were kept, not redone
    assert not list((run_dir / "label").rglob(".part-*"))

    model, tok, spec = load_model(str(run_dir / "teacher" / "model"))
    for task in TASKS:
        got = _read(run_dir, task)
        assert got.schema.remove_metadata() == TASKS[task].label_schema
        ids = got.column("example_id").to_pylist()
        want = pq.read_table(run_dir / "prepare" / "examples" / task, columns=["example_id"]).column(0).to_pylist()
        reliability["rows_lost"] = reliability.get("rows_lost", 0) + len(set(want) - set(ids))
        assert len(ids) == len(set(ids)) and set(ids) == set(want)
    # blocks go to whichever worker asks first; over ~100 CTR blocks both get some
    assert {p.name.split("-")[2] for p in (run_dir / "label").rglob("part-*.parquet")} == {"000", "001"}
    rec = _read(run_dir, "recommendation")
    assert set(map(len, rec.column("top_ids").to_pylist())) == {5}
    assert set(map(len, _read(run_dir, "intent").column("logits").to_pylist())) == {len(spec.classes["intent"])}
    # labels are the teacher's own outputs, joined by example id
    ex = pq.read_table(run_dir / "prepare" / "examples" / "ctr" / "valid").slice(0, 64).to_pandas()
    logits = model.ctr_logits(pad_histories(ex["history"], cfg.tasks.ctr.max_history), torch.tensor(ex["item"].to_numpy()),
                              torch.tensor(ex["slot"].fillna(-1).to_numpy().astype(np.int64)))
    lab = _read(run_dir, "ctr").to_pandas().set_index("example_id").loc[ex["example_id"], "logit"].to_numpy()
    assert np.allclose(lab, logits.detach().numpy(), atol=1e-4)
    ex = pq.read_table(run_dir / "prepare" / "examples" / "intent" / "train").slice(0, 64).to_pandas()
    want = model.class_logits("intent", **text_inputs(tok, ex["text"].tolist(), max_length=cfg.teacher.max_length,
                                             buckets=model.lexical_buckets)).detach().numpy()
    got = _read(run_dir, "intent").to_pandas().set_index("example_id").loc[ex["example_id"], "logits"]
    assert np.allclose(np.stack(got.to_numpy()), want, atol=1e-4)

    # the final check fails loudly on a lost or a duplicated part
    part = next((run_dir / "label" / "ctr" / "train").glob("part-*.parquet"))
    copy = part.with_name(part.name.replace("part-", "part-dup"))
    shutil.copy(part, copy)
    with pytest.raises(StageError, match="label count mismatch for ctr/train: .* duplicated"):
        label.verify(cfg, str(run_dir / "label"), ["ctr"])
    copy.unlink()
    part.unlink()
    with pytest.raises(StageError, match=r"label count mismatch for ctr/train: .* \d+ examples unlabelled"):
        label.verify(cfg, str(run_dir / "label"), ["ctr"])




@pytest.mark.integration
@pytest.mark.usefixtures("ray_local")
def test_fsdp_sharded_encoder_labels_like_the_whole_model(trained):
    """teacher.shard=fsdp on two CPU workers (gloo): each text task's encoder is split between them, the workers
    run the sharded forwards in lockstep although their shards differ in size, and the logits are
    the unsharded model's."""
    from distillery.models.teacher import load_model

    cfg, run_dir = trained
    tasks = cfg.tasks.model_copy(update={
        "recommendation": cfg.tasks.recommendation.model_copy(update={"enabled": False}),
        "ctr": cfg.tasks.ctr.model_copy(update={"enabled": False})})
    cfg = _with_label(cfg, num_workers=2, cpus_per_worker=0.5, text_batch_size=8).model_copy(update={
        "tasks": tasks, "teacher": cfg.teacher.model_copy(update={"shard": "fsdp"})})
    m = runner.run(cfg, ["label"], force=True)["label"]
    prepared = json.loads((run_dir / "prepare" / "manifest.json").read_text())["examples"]
    assert m["examples"] == {t: prepared[t] for t in ("intent", "sentiment")}  # both text tasks, each encoder sharded
    model, tok, _ = load_model(str(run_dir / "teacher" / "model"))
    for task in ("intent", "sentiment"):
        ex = pq.read_table(run_dir / "prepare" / "examples" / task / "train").slice(0, 32).to_pandas()
        want = model.class_logits(task, **text_inputs(tok, ex["text"].tolist(), max_length=cfg.teacher.max_length,
                                                      buckets=model.lexical_buckets)).detach().numpy()
        got = _read(run_dir, task).to_pandas().set_index("example_id").loc[ex["example_id"], "logits"]
        assert np.allclose(np.stack(got.to_numpy()), want, atol=1e-4), task
