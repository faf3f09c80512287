"""The distill stage end to end on a tiny run: the KD student and the no-KD baseline are trained by
Ray Train from the label stage's output, saved, evaluated, and a re-run keeps what finished."""
import json
import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import small_student
from distillery import runner, tasks
from distillery.errors import StageError
from distillery.stages import distill
from distillery.tasks import SCORE_METRIC, TASKS


def test_shares_split_the_batch_by_the_mix_and_refuse_a_task_without_one(prepared):
    cfg = prepared[0]
    assert distill._shares(cfg, ["recommendation", "ctr", "intent"]) == {"recommendation": 154, "ctr": 256, "intent": 102}
    cfg2 = cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"mix": {"ctr": 1.0}})})
    assert distill._shares(cfg2, ["ctr"]) == {"ctr": 512}
    with pytest.raises(StageError, match="distill.mix gives no share to the enabled task"):
        distill._shares(cfg2, ["ctr", "intent"])


def test_a_task_folder_without_its_split_folders_names_the_stage_to_rerun(tmp_path):
    import pyarrow.parquet as pq

    with pytest.raises(StageError, match=f"{tmp_path} has none of the split folders train, transfer: re-run the label"):
        distill._read_splits(str(tmp_path), ["train", "transfer"], ["example_id"], "label")
    (tmp_path / "train").mkdir()
    pq.write_table(pa.table({"example_id": ["a", "b"], "x": [1, 2]}), tmp_path / "train" / "part-0.parquet")
    assert distill._read_splits(str(tmp_path), ["train", "transfer"], ["example_id"], "label").num_rows == 2


def test_select_rebuilds_the_intent_bags_of_the_chosen_rows():
    bag = pa.array([[1, 2], [], [3, 4, 5], [6]], pa.list_(pa.int32()))
    t = pa.table({"bag": bag, "label": pa.array([0, 1, 2, 3], pa.int32()),
                  "logits": pa.array([[0.0, 1.0]] * 4, pa.list_(pa.float32()))})
    tensors = TASKS["intent"].tensors(t, None)
    out = distill._select(tensors, torch.tensor([2, 1, 0, 2]), "cpu")
    assert out["bag_ids"].tolist() == [3, 4, 5, 1, 2, 3, 4, 5]
    assert out["bag_offsets"].tolist() == [0, 3, 3, 5] and out["label"].tolist() == [2, 1, 0, 2]


def test_transfer_texts_train_the_kd_student_only(labelled):
    from transformers import AutoTokenizer

    cfg, run_dir = labelled
    tok = AutoTokenizer.from_pretrained(str(run_dir / "teacher" / "model"))
    spec = distill.student_spec(cfg, str(run_dir / "prepare"), tok)
    assert (spec.max_length, spec.ngram_buckets) == (cfg.teacher.max_length, cfg.student.ngram_buckets)
    table = distill.training_table(cfg, "intent", tok, spec)
    labels = table.column("label").to_numpy()
    transfer = json.loads((run_dir / "prepare" / "manifest.json").read_text())["examples"]["intent"]["transfer"]
    assert (labels == -1).sum() == transfer > 0
    assert TASKS["intent"].training_rows(table, kd=True).num_rows == table.num_rows
    kept = TASKS["intent"].training_rows(table, kd=False)
    assert kept.num_rows == table.num_rows - transfer and min(kept.column("label").to_pylist()) >= 0
    assert TASKS["ctr"].training_rows(table, kd=False).num_rows == table.num_rows


def test_the_class_balanced_soft_term_weighs_by_the_teachers_picks_over_the_training_rows(labelled):
    from distillery.config import RunConfig
    from distillery.losses import class_balance_weights

    cfg, _ = labelled
    inp = distill.inputs(cfg)
    table, intent = inp.tables["intent"], TASKS["intent"]
    picks = np.stack(table.column("logits").to_numpy(zero_copy_only=False)).argmax(1)
    counts = inp.loss_context["intent"]
    assert counts == np.bincount(picks, minlength=len(inp.spec.classes["intent"])).tolist()
    assert intent.loss(cfg, kd=True, context=counts).class_weight is None  # off
    raw = cfg.model_dump(mode="json")
    raw["tasks"]["intent"]["kd_class_power"] = 0.5
    on = RunConfig.model_validate(raw)
    loss = intent.loss(on, kd=True, context=counts)
    want = class_balance_weights(torch.tensor(counts), 0.5)
    assert torch.equal(loss.class_weight, want) and loss.alpha == cfg.tasks.intent.alpha
    assert intent.loss(on, kd=False, context=counts).alpha == 0
    with pytest.raises(StageError, match="kd_class_power"):
        intent.loss(on, kd=True)


def test_the_text_table_has_its_own_rate_and_no_decay_and_every_parameter_one_group(prepared):
    from distillery.models.student import Student

    dc = prepared[0].distill.model_copy(update={"lr": 2e-3, "text_lr_scale": 5.0, "weight_decay": 0.1})
    model = Student(vocab_size=50, n_items=10, n_categories=3, classes={"intent": 4}, item_category=torch.zeros(10),
                    item_bag_ids=torch.tensor([3, 4]), item_bag_offsets=torch.zeros(10), dim=8, text_dim=4,
                    ngram_buckets=16)
    groups = distill.optimizer(model, dc).param_groups
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each exactly once
    [text] = [g for g in groups if any(p is model.text.weight for p in g["params"])]
    assert len(text["params"]) == 1 and text["lr"] == pytest.approx(1e-2) and text["weight_decay"] == 0.0
    [decayed] = [g for g in groups if g["weight_decay"] > 0]
    assert decayed["lr"] == 2e-3 and any(p is model.classifiers["intent"][0].weight for p in decayed["params"])
    assert all(p.ndim > 1 for p in decayed["params"])


def test_the_students_score_is_the_mean_ratio_to_the_teacher():
    teacher = {"recommendation": {"ndcg@10": 0.2}, "ctr": {"auc": 0.8}, "intent": {"macro_f1": 0.5}}
    student = {"recommendation": {"ndcg@10": 0.1}, "ctr": {"auc": 0.8}, "intent": {"macro_f1": 0.6}}
    assert tasks.teacher_relative_score(student, teacher) == pytest.approx((0.5 + 1.0 + 1.2) / 3)


@pytest.mark.integration
@pytest.mark.usefixtures("ray_local")
def test_distill_trains_the_student_and_the_no_kd_baseline_and_keeps_finished_variants(labelled, capfd):
    cfg, run_dir = labelled
    cfg = small_student(cfg)
    m = runner.run(cfg, ["distill"])["distill"]
    assert "[distill] test metrics" in capfd.readouterr().out
    for variant in distill.VARIANTS:
        d = run_dir / "distill" / variant
        metrics = json.loads((d / "metrics.json").read_text())
        assert set(metrics["test"]) == set(TASKS)
        assert {"ndcg@10", "hr@10", "mrr"} <= set(metrics["test"]["recommendation"])
        assert len(json.loads((d / "history.json").read_text())) == 2
        assert (d / "model" / "model.safetensors").exists() and (d / "model" / "student.json").exists()
        assert m[variant]["params"] > 0 and np.isfinite(m[variant]["valid_score"])
    assert not (run_dir / "distill" / "ray_train").exists()
    # the variants differ in what they learn from: the KD losses mix in the teacher at the config's
    # alpha, the no-KD ones never do (training_rows, tested above, drops the intent transfer texts)
    for t in ("recommendation", "ctr", "intent"):
        assert TASKS[t].loss(cfg, kd=True).alpha == getattr(cfg.tasks, t).alpha > 0
        assert TASKS[t].loss(cfg, kd=False).alpha == 0

    # interrupted after the KD student finished: a re-run keeps it and trains only the baseline
    kept = (run_dir / "distill" / "student" / "model" / "model.safetensors").stat().st_mtime_ns
    (run_dir / "distill" / "manifest.json").unlink()
    shutil.rmtree(run_dir / "distill" / "student_no_kd")
    runner.run(cfg, ["distill"])
    out = capfd.readouterr().out
    assert "resuming an interrupted run" in out and "student: already trained, kept" in out
    assert (run_dir / "distill" / "student" / "model" / "model.safetensors").stat().st_mtime_ns == kept
    assert (run_dir / "distill" / "student_no_kd" / "metrics.json").exists()

    # the report stage: the contract of report.json, the markdown and the plots
    cfg = cfg.model_copy(update={"report": cfg.report.model_copy(update={"latency_requests": 10})})
    runner.run(cfg, ["report"])
    rep = json.loads((run_dir / "report" / "report.json").read_text())
    assert set(rep) == {"dataset", "models", "tasks", "relative_to_teacher"}
    # each student over the teacher with its interval; the point is the two test metrics' ratio
    assert set(rep["relative_to_teacher"]) == {"student", "student_no_kd"}
    for name, by_task in rep["relative_to_teacher"].items():
        assert set(by_task) == set(TASKS)
        for task, metric in SCORE_METRIC.items():
            r, test = by_task[task], rep["tasks"][task]
            assert r["metric"] == metric and r["resamples"] > 0
            if test["teacher"][metric]:  # recomputed in the report stage's process: equal up to float noise
                assert r["ratio"] == pytest.approx(test[name][metric] / test["teacher"][metric], abs=0.02)
                assert r["low"] <= r["high"]
    assert set(rep["models"]) == {"teacher", "student", "student_no_kd"}
    for m in rep["models"].values():
        assert m["params"] > 0 and m["bytes"] > 0
        assert 0 < m["cpu_latency_ms"]["p50"] <= m["cpu_latency_ms"]["p99"]
        assert set(m["cpu_throughput"]) == {"batch1", "batch256"} and min(m["cpu_throughput"].values()) > 0
        assert set(m["cpu_latency_ms_by_task"]) == set(TASKS)
    assert rep["models"]["teacher"]["params"] > 10 * rep["models"]["student"]["params"]
    assert set(rep["tasks"]) == set(TASKS)
    for task, metric in (("recommendation", "mrr"), ("ctr", "gauc"), ("intent", "macro_f1")):
        assert set(rep["tasks"][task]) == {"teacher", "student", "student_no_kd", "baselines"}
        assert all(metric in rep["tasks"][task][n] for n in ("teacher", "student", "student_no_kd"))
    # every baseline of the teacher stage, the SASRec one included, reaches report.json, the table and the markdown
    assert set(rep["tasks"]["recommendation"]["baselines"]) == set(rep["tasks"]["ctr"]["baselines"]) == {"popularity", "sasrec"}
    assert set(rep["tasks"]["intent"]["baselines"]) == {"tfidf_logreg"}
    md = (run_dir / "report" / "report.md").read_text()
    assert "sasrec (baseline)" in md and "popularity (baseline)" in md
    for png in ("tasks.png", "size_latency.png", "training.png"):
        assert (run_dir / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png})" in md
    out = capfd.readouterr().out
    assert "student vs teacher:" in out and "(sasrec)" in out and "(popularity)" in out
    assert "student / teacher (95% interval): recommendation" in out
    assert "## Relative to the teacher" in md


def test_report_markdown_labels_the_sampled_protocol_and_the_summary_gives_the_ratios():
    from distillery.stages import report

    speed = {"cpu_latency_ms": {"p50": 10.0, "p99": 12.0}, "cpu_latency_ms_by_task": {"intent": 10.0},
             "cpu_throughput": {"batch1": 100.0, "batch256": 300.0}}
    small = {**speed, "cpu_latency_ms": {"p50": 0.5, "p99": 0.9}, "cpu_latency_ms_by_task": {"intent": 0.5}}
    rec = {"hr@10": 0.2, "ndcg@10": 0.1, "mrr": 0.1, "hr@10_sampled100": 0.6, "ndcg@10_sampled100": 0.3}
    rep = {"dataset": {"users": 3}, "models": {"teacher": {"params": 1000, "bytes": 4000, **speed},
                                               "student": {"params": 50, "bytes": 200, **small}},
           "tasks": {"recommendation": {"teacher": rec, "student": rec, "baselines": {"popularity": rec}}}}
    md = report.markdown(rep, ["tasks.png"])
    assert "| ndcg@10_sampled100 (100 sampled negatives, SASRec protocol) | 0.3000 | 0.3000 | 0.3000 |" in md
    assert "| student | 50 | 200 | 0.50 | 0.90 | 0.50 |" in md and "![tasks.png](tasks.png)" in md
    assert "20.0x fewer parameters, 20.0x lower p50 latency at batch 1 (intent 20.0x)" in report.summary_table(rep)
    lines = md.splitlines()  # every table's delimiter row has as many columns as its header
    for header, delimiter in zip(lines, lines[1:]):
        if delimiter.startswith("|---"):
            assert header.count("|") == delimiter.count("|"), header


def test_report_summary_compares_the_compressed_variant_with_the_student_it_came_from():
    from distillery.stages import report

    def model(mb, req_s):
        return {"params": 10, "bytes": mb * 1e6, "cpu_latency_ms": {"p50": 1.0, "p99": 1.0},
                "cpu_latency_ms_by_task": {"intent": 1.0}, "cpu_throughput": {"batch1": 1.0, "batch256": req_s}}

    rep = {"models": {"teacher": model(40, 10.0), "student": model(8, 100.0), "student_tuned": model(16, 50.0),
                      "student_units75_int8": model(2, 100.0)}, "tasks": {}}
    # the sweep ran but the distill stage's student won: compress started from it, not from student_tuned
    rep["compressed"] = {"variant": "student_units75_int8", "from": "student"}
    assert "student_units75_int8 vs the float32 student it came from: 4.0x smaller file, 1.00x" in report.summary_table(rep)
    rep["compressed"]["from"] = "student_tuned"
    assert "it came from: 8.0x smaller file, 2.00x throughput" in report.summary_table(rep)
