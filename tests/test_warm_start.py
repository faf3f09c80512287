"""Incremental re-distillation (`--warm-start BUNDLE`): the earlier teacher is reused, only examples
without a cached label go to the teacher, and the student starts from the bundle."""
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import ROOT
from distillery import runner, storage, warmstart
from distillery.config import load_config
from distillery.data import examples as ex
from distillery.errors import DataError, StageError
from distillery.stages import label
from distillery.tasks import TASKS


# ------------------------------------------------------------------------------ units
def _rows(history, item, slot=None):
    return pa.table({"history": pa.array(history, pa.list_(pa.int32())), "item": pa.array(item, pa.int32()),
                     "slot": pa.array(slot or [None] * len(item), pa.int32())})


def test_fingerprints_hash_the_teacher_inputs_not_ids_users_or_splits():
    a = _rows([[2, 3], [2, 3], [3, 2], [2, 3], []], [5, 6, 5, 5, 5], [0, 0, 0, 1, None])
    rec, ctr = label.fingerprints("recommendation", a).to_pylist(), label.fingerprints("ctr", a).to_pylist()
    assert rec[0] == rec[3] and len({rec[0], rec[1], rec[2], rec[4]}) == 4  # rec ignores the slot
    assert len(set(ctr)) == 5  # ... ctr does not
    assert set(rec).isdisjoint(ctr)  # the task is part of the hash
    # same content, other ids and splits, and a sliced (offset) list array: same fingerprints
    b = a.append_column("example_id", pa.array(list("vwxyz"))).append_column("split", pa.array(["test"] * 5))
    assert label.fingerprints("ctr", b.slice(1, 3)).to_pylist() == ctr[1:4]
    assert label.fingerprints("ctr", pa.concat_tables([a.slice(0, 2), a.slice(2)])).to_pylist() == ctr
    texts = label.fingerprints("intent", pa.table({"text": ["desk lamp", "desk lamp", "desk lamps"]})).to_pylist()
    assert texts[0] == texts[1] != texts[2]


def test_intent_examples_keep_the_given_classes():
    counts = pd.DataFrame({"text": ["a", "b", "c", "d", "e"], "label": ["X", "Y", "Y", "Z", "X"], "count": [1] * 5})
    df, names = ex.intent_examples(counts, min_class_count=3, fractions=(0.8, 0.1, 0.1), prefix="intent", classes=["X", "Z", "other"])
    assert names == ["X", "Z", "other"]  # kept, though X and Z are rare here
    assert dict(zip(df["text"], df["label_name"])) == {"a": "X", "b": "other", "c": "other", "d": "Z", "e": "X"}
    assert dict(zip(df["text"], df["label"])) == {"a": 0, "b": 2, "c": 2, "d": 1, "e": 0}
    df, names = ex.intent_examples(counts, min_class_count=1, fractions=(0.8, 0.1, 0.1), prefix="intent", classes=["X", "Y"])
    assert sorted(df["text"]) == ["a", "b", "c", "e"]  # no 'other' class to put Z's text in


def test_reuse_labels_refuses_labels_of_another_teacher_or_setting(tmp_path, capfd):
    source = tmp_path / "old_label"
    source.mkdir()
    (source / "manifest.json").write_text(json.dumps({"status": "complete", "cache_key": "abc"}))
    assert label.reuse_labels({"ctr": None}, str(tmp_path / "new"), str(source), "xyz", 100) == {}
    assert "came from another teacher or other settings" in capfd.readouterr().out
    assert label.reuse_labels({"ctr": None}, str(tmp_path / "new"), str(tmp_path / "absent"), "xyz", 100) == {}
    assert "no finished label stage" in capfd.readouterr().out


def test_warm_start_flag_sets_the_override_and_a_bad_bundle_stops_before_any_stage(tmp_path, capsys):
    from distillery import cli

    args = cli.build_parser().parse_args(["run", "c.yaml", "--warm-start", "b/bundle"])
    assert args.warm_start == "b/bundle"
    rc = cli.main(["run", str(ROOT / "configs" / "demo.yaml"), "--warm-start", str(tmp_path / "nope"),
                   f"run_dir={tmp_path / 'run'}"])
    assert rc == 2 and "failed verification" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert runner.parse_stages(None, warm_start=True) == [s for s in runner.STAGES if s != "tune"]


# ------------------------------------------------------------------------------ two windows on Ray
def _content(run_dir: Path, task: str) -> pd.DataFrame:
    """example_id, split and a content key computed here, independently of label.fingerprints."""
    df = pq.read_table(run_dir / "prepare" / "examples" / task).to_pandas()
    if "text" in df.columns:  # a text task: its text is all the teacher sees
        df["key"] = df["text"]
    else:
        slot = df["slot"].fillna(-1).astype(int) if task == "ctr" else -1
        df["key"] = [f"{list(h)}|{i}|{s}" for h, i, s in
                     zip(df["history"], df["item"], slot if task == "ctr" else [-1] * len(df))]
    return df


@pytest.fixture(scope="module")
def windows(tmp_path_factory, tiny_bert, ray_local):
    """An earlier run over window 1 (prepare, an untrained tiny teacher, labels, a bundle) and the
    files of window 2: the same catalogue and the clicks and reviews of window 1 plus later ones."""
    from distillery import quant, shrink
    from distillery.config import SyntheticConfig
    from distillery.data import synthetic
    from distillery.models import student as S
    from distillery.models import teacher as teacher_model
    from distillery.models.seqrec import SeqSpec
    from distillery.models.teacher import load_backbone
    from distillery.serving import bundle
    from distillery.stages import distill, teacher
    from distillery.stages.prepare import write_tables

    tmp = tmp_path_factory.mktemp("warm")
    tables = synthetic.generate(SyntheticConfig(users=80, items=60, sessions_per_user=8))
    inter, reviews = tables["interactions"].to_pandas(), tables["reviews"].to_pandas()
    cut = np.quantile(inter["timestamp"], 0.85)
    write_tables({"items": tables["items"],
                  "reviews": pa.Table.from_pandas(reviews[reviews["timestamp"] < cut], preserve_index=False),
                  "interactions": pa.Table.from_pandas(inter[inter["timestamp"] < cut], preserve_index=False)},
                 str(tmp / "w1"))
    write_tables(tables, str(tmp / "w2"))

    def config(window: str, run: str, *overrides: str):
        return load_config(ROOT / "configs" / "demo.yaml", [
            f"run_dir={tmp / run}", "data.format=native", f"data.items={tmp / window / 'items.parquet'}",
            f"data.interactions={tmp / window / 'interactions.parquet'}", f"data.reviews={tmp / window / 'reviews.parquet'}",
            "data.user_buckets=4", "tasks.intent.min_class_count=3", f"teacher.model={tiny_bert}",
            "label.top_k=8", "label.cpus_per_worker=1", "distill.epochs=1", "distill.steps_per_epoch=2",
            "distill.cpus_per_worker=1", "report.latency_requests=10", *overrides])

    old = config("w1", "old")
    runner.run(old, ["prepare"])
    backbone, tok = load_backbone(tiny_bert)
    tspec = teacher.teacher_spec(old, str(tmp / "old" / "prepare"), text_dim=backbone.config.hidden_size)
    torch.manual_seed(0)
    model = teacher_model.build(backbone, tspec, torch.randn(tspec.n_items, backbone.config.hidden_size))
    teacher_model.save_model(model, tok, tspec, str(tmp / "old" / "teacher" / "model"))
    # and the SASRec baseline the teacher stage chose, which a warm start measures on the new window
    spec = SeqSpec(n_items=tspec.n_items, dim=16, layers=1, heads=2, dropout=0.1, max_history=tspec.max_history)
    teacher_model.save_weights(teacher_model.build_member(spec, tspec, ctr_head=False),
                         str(tmp / "old" / "teacher" / "sasrec" / "sasrec-d16-p0.1" / "model.safetensors"))
    storage.write_json(str(tmp / "old" / "teacher" / "metrics.json"),
                       {"sasrec_chosen": "sasrec-d16-p0.1",
                        "sasrec_grid": [{"name": "sasrec-d16-p0.1", "spec": spec.to_json(), "best_epoch": 1,
                                         "valid": {"recommendation": {"ndcg@10": 0.0}}}]})
    storage.write_json(str(tmp / "old" / "teacher" / "manifest.json"), {"stage": "teacher", "status": "complete"})
    runner.run(old, ["label"])
    # the earlier student's bundle, as the compress stage writes it: compact (vocabulary pruned, item
    # text folded), 8-bit, naming the uncompressed student it was made from
    smeta = distill.student_spec(old, str(tmp / "old" / "prepare"), tok)
    student = S.build_for_run(smeta, str(tmp / "old" / "prepare"), tok)
    student_dir = tmp / "old" / "distill" / "student" / "model"
    S.save(student, tok, smeta, str(student_dir))
    compact, cmeta = shrink.prune_vocabulary(student, smeta, shrink.token_counts(smeta, [student.item_bag_ids]))
    compact, cmeta = shrink.fold_item_text(compact, cmeta)
    items = pq.read_table(tmp / "old" / "prepare" / "items.parquet",
                          columns=["idx", "item_id", "title", "category", "category_idx", "clicks"])
    bundle.write(str(tmp / "old" / "bundle"), state=quant.quantize_state(compact.state_dict()), tokenizer=tok,
                 items=items, metrics={},
                 config={"spec": cmeta.to_json(), "weights": "int8-rowwise", "variant": "student_compact_int8", "source": "distill",
                         "run_dir": str(tmp / "old"), "student_dir": str(student_dir)})
    return tmp, config


@pytest.mark.integration
@pytest.mark.slow
def test_warm_start_reuses_teacher_and_labels_and_starts_the_student_from_the_bundle(windows, capfd):
    from safetensors.torch import load_file

    tmp, config = windows
    bundle_dir = tmp / "old" / "bundle"
    # a learning rate too small to move the weights: the trained student is its starting point
    cfg = config("w2", "new", f"warm_start={bundle_dir}", "distill.lr=1e-9")
    ms = runner.run(cfg, runner.parse_stages(None, warm_start=True))
    out = capfd.readouterr().out
    assert "tune" not in ms

    # the teacher: copied, not trained, and evaluated on the new window
    assert ms["teacher"]["reused_from"] == str(tmp / "old")
    assert (storage.sha256(str(tmp / "new" / "teacher" / "model" / "model.safetensors"))
            == storage.sha256(str(tmp / "old" / "teacher" / "model" / "model.safetensors")))
    assert not (tmp / "new" / "teacher" / "history.json").exists()
    # the earlier SASRec, copied beside it (a run warm-started from this one needs it) and measured here
    assert (tmp / "new" / "teacher" / "sasrec" / "sasrec-d16-p0.1" / "model.safetensors").exists()
    tm = json.loads((tmp / "new" / "teacher" / "metrics.json").read_text())
    assert tm["sasrec_chosen"] == "sasrec-d16-p0.1" and "ndcg@10" in tm["baselines"]["recommendation"]["sasrec"]

    # labels: the teacher saw exactly the examples whose content the earlier run had not labelled
    lm = ms["label"]
    for task in TASKS:
        old, new = _content(tmp / "old", task), _content(tmp / "new", task)
        fresh = int((~new["key"].isin(set(old["key"]))).sum())
        assert lm["labelled"][task] == fresh and lm["reused"][task] == len(new) - fresh, task
        assert 0 < fresh < len(new), task  # the new window adds examples and repeats most
        got = pq.read_table(tmp / "new" / "label" / task).to_pandas()
        assert sorted(got["example_id"]) == sorted(new["example_id"])  # one label per example
        # a reused label is the earlier label of the same content
        before = pq.read_table(tmp / "old" / "label" / task).to_pandas().merge(old[["example_id", "key"]], on="example_id")
        col = TASKS[task].label_columns[0]
        merged = got.merge(new[["example_id", "key"]], on="example_id").merge(before[["key", col]], on="key",
                                                                               suffixes=("", "_before"))
        assert len(merged) >= lm["reused"][task]
        assert all(np.allclose(a, b) for a, b in zip(merged[col], merged[col + "_before"]))
    assert lm["counts"]["labelled"] + lm["counts"]["reused"] == lm["counts"]["labels"]
    assert "reused from" in out

    # the student: started from the bundle (the baseline did not), compared with it on the new window
    assert json.loads((bundle_dir / "config.json").read_text())["spec"]["item_text"] is False  # a compact bundle
    start = load_file(str(tmp / "old" / "distill" / "student" / "model" / "model.safetensors"))
    kd = load_file(str(tmp / "new" / "distill" / "student" / "model" / "model.safetensors"))
    no_kd = load_file(str(tmp / "new" / "distill" / "student_no_kd" / "model" / "model.safetensors"))
    assert torch.allclose(kd["item.weight"], start["item.weight"], atol=1e-5)
    assert not torch.allclose(no_kd["item.weight"], start["item.weight"], atol=1e-3)
    warm = json.loads((tmp / "new" / "distill" / "warm_start.json").read_text())
    assert warm["bundle"] == str(bundle_dir) and set(warm["previous"]["test"]) == set(TASKS)
    assert "previous" in out and "change" in out
    report = json.loads((tmp / "new" / "report" / "report.json").read_text())
    assert "student_previous" in report["models"] and report["warm_start"]["previous_run"] == str(tmp / "old")
    assert report["tasks"]["ctr"]["student_previous"] == warm["previous"]["test"]["ctr"]


@pytest.mark.integration
@pytest.mark.slow
def test_warm_start_refuses_what_it_cannot_continue(windows, tmp_path, monkeypatch):
    tmp, config = windows
    bundle_dir = tmp / "old" / "bundle"
    with pytest.raises(StageError, match="give the new window a new run_dir"):
        warmstart.source(config("w2", "old", f"warm_start={bundle_dir}"))
    with pytest.raises(StageError, match="does not tune"):
        runner.run(config("w2", "other", f"warm_start={bundle_dir}"), ["tune"])
    # a catalogue with one more item
    items = pq.read_table(tmp / "w2" / "items.parquet").to_pandas()
    grown = pd.concat([items, items.tail(1).assign(item_id="i999999")], ignore_index=True)
    (tmp_path / "w3").mkdir()
    pq.write_table(pa.Table.from_pandas(grown, preserve_index=False), tmp_path / "w3" / "items.parquet")
    for name in ("interactions", "reviews"):
        shutil.copy(tmp / "w2" / f"{name}.parquet", tmp_path / "w3" / f"{name}.parquet")
    cfg = config("w2", "grown", f"warm_start={bundle_dir}", f"data.items={tmp_path / 'w3' / 'items.parquet'}")
    with pytest.raises(DataError, match=r"adds 1 items \(e.g. \['i999999'\]\) and lacks 0"):
        runner.run(cfg, ["prepare"])
    # a student of another width
    src = warmstart.source(config("w2", "x", f"warm_start={bundle_dir}"))
    wider = dataclasses.replace(src.spec, dim=src.spec.dim * 2)
    with pytest.raises(StageError, match=r"student.dim: bundle \d+, this run \d+"):
        warmstart.check_student(config("w2", "x", f"warm_start={bundle_dir}"), wider)
    # every stage asks for the source; the bundle is hashed once, and again when a file of it changes
    copied = tmp_path / "copied"
    shutil.copytree(bundle_dir, copied)
    verify, calls = warmstart.bundle.verify, []
    monkeypatch.setattr(warmstart.bundle, "verify", lambda path: calls.append(path) or verify(path))
    for _ in range(3):
        warmstart.source(config("w2", "x", f"warm_start={copied}"))
    assert len(calls) == 1
    (copied / "metrics.json").write_text("{}\n")
    with pytest.raises(Exception, match="failed verification"):
        warmstart.source(config("w2", "x", f"warm_start={copied}"))
    assert len(calls) == 2
