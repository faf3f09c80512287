"""The tune and compress stages and the bundle: search space, 8-bit weights, pruning, the choice of
variant, bundle verification, and the stages end to end on a tiny run."""
import json
import shutil
import sys

import pytest
import torch
from conftest import small_student
from distillery import cli, quant, runner
from distillery.config import load_config, with_trial
from distillery.errors import ConfigError
from distillery.models.student import StudentSpec
from distillery.serving import bundle
from distillery.stages import compress, tune
from hypothesis import given, settings
from hypothesis import strategies as st


# ------------------------------------------------------------------------------ search space
@pytest.mark.parametrize("override, key", [
    ("tune.space.temperature.low=-1", "tune.space.temperature"),
    ("tune.space.alpha.high=1.5", "alpha must lie in [0, 1]"),
    ("tune.space.dim=[]", "dim must be a non-empty list"),
    ("tune.space.lr.low=0.1", "low (0.1) must be below high (0.01)"),
    ("tune.space.kd_class_power.high=3", "kd_class_power must lie in [0, 2]"),
    ("tasks.intent.kd_class_power=-0.5", "tasks.intent.kd_class_power"),
    ("compress.unit_keep=[0.5,1.0]", "unit_keep fractions must lie strictly between 0 and 1"),
])
def test_an_invalid_search_space_fails_at_load_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")):
        load_config("configs/demo.yaml", [override])


def test_one_bound_can_be_overridden_without_restating_the_range():
    cfg = load_config("configs/demo.yaml", ["tune.space.lr.low=1e-4"])
    assert (cfg.tune.space.lr.low, cfg.tune.space.lr.high, cfg.tune.space.lr.log) == (1e-4, 1e-2, True)


def test_trial_config_puts_sampled_values_in_their_places():
    cfg = load_config("configs/demo.yaml", ["tune.space.dim=[32,64]"])
    space = tune.param_space(cfg.tune.space, ["recommendation", "intent"])
    assert set(space) == {"temperature", "alpha", "weight", "lr", "rank_weight", "kd_class_power", "dim"}
    assert set(space["alpha"]) == {"recommendation", "intent"}
    assert "rank_weight" not in tune.param_space(cfg.tune.space, ["ctr", "intent"])  # a recommendation-only knob
    assert "kd_class_power" not in tune.param_space(cfg.tune.space, ["recommendation", "ctr"])  # an intent-only one
    params = {"temperature": {"recommendation": 3.5, "intent": 1.5}, "alpha": {"intent": 0.25}, "lr": 0.004, "dim": 32,
              "rank_weight": 0.4, "kd_class_power": 0.7}
    t = with_trial(cfg, params)
    assert (t.tasks.recommendation.temperature, t.tasks.intent.temperature, t.tasks.intent.alpha) == (3.5, 1.5, 0.25)
    assert (t.tasks.recommendation.rank_weight, t.tasks.intent.kd_class_power) == (0.4, 0.7)
    assert t.tasks.ctr.temperature == cfg.tasks.ctr.temperature  # not searched: unchanged
    assert (t.distill.lr, t.student.dim, t.distill.epochs) == (0.004, 32, cfg.tune.epochs)


def test_the_defaults_are_the_first_point_clamped_into_the_space():
    cfg = load_config("configs/demo.yaml", ["tasks.ctr.temperature=20", "tune.space.dim=[32,96]"])
    point = tune.defaults_point(cfg, cfg.tune.space, ["ctr", "intent"])
    intent = cfg.tasks.intent
    assert point["temperature"] == {"ctr": 10.0, "intent": intent.temperature}
    assert point["alpha"] == {"ctr": cfg.tasks.ctr.alpha, "intent": intent.alpha}
    assert point["lr"] == cfg.distill.lr and point["dim"] == 32  # 64 is not a choice: the first one


def test_trial_folders_and_errors_are_read_back():
    assert tune._trial_dir_parts("/x/sweep/_trial_760af7e8_2_ctr=0.6_2026-11-23_04-28-04") == ("760af7e8", 2)
    assert tune._trial_dir_parts("/x/_trial_3fa1c_00004_5_lr=0.01_2026") == ("3fa1c_00004", 5)
    assert tune._trial_dir_parts("/x/_wrapped_trial_760af7e8_12_lr=0.01_2026") == ("760af7e8", 12)
    assert tune._trial_dir_parts("/x/not_a_trial") == ("unknown", -1)
    err = RuntimeError("\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=1)\n  File x\nValueError: bad trial\n")
    assert tune._error_line(err) == "ValueError: bad trial"


def test_a_sweep_made_before_distill_was_rerun_is_not_current_and_not_the_winner(tmp_path):
    from distillery import storage
    from distillery.config import stable_hash
    from distillery.layout import RunLayout

    layout = RunLayout(str(tmp_path))

    def finish(stage, *upstream):
        m = {"stage": stage, "status": "complete",
             "upstream": {u: stable_hash(storage.read_json(layout.manifest(u))) for u in upstream}}
        storage.makedirs(layout.stage(stage))
        storage.write_json(layout.manifest(stage), m)

    finish("prepare")
    finish("distill", "prepare")
    for folder in (layout.distill.variant("student").model, layout.tune.best.model):
        storage.makedirs(folder)
        (tmp_path / folder / "model.safetensors").write_bytes(b"x")
    storage.write_json(layout.tune.summary, {"winner": "tune", "params": {}, "trial_id": "t1"})
    finish("tune", "prepare", "distill")
    finish("compress", "distill", "tune")
    assert layout.current("tune") and layout.current("compress") and layout.winner().source == "tune"
    storage.write_json(layout.manifest("distill"), {**storage.read_json(layout.manifest("distill")), "created": "later"})
    assert layout.current("distill") and not layout.current("tune") and not layout.current("compress")
    assert layout.winner().source == "distill"
    finish("tune", "prepare", "distill")  # the sweep run again on the new distill stage
    assert layout.current("tune") and not layout.current("compress") and layout.winner().source == "tune"
    assert not layout.current("label")  # never ran


# ------------------------------------------------------------------------------ 8-bit weights
def test_rowwise_int8_keeps_every_entry_within_half_a_step_of_its_row():
    torch.manual_seed(0)
    w = torch.randn(50, 16) * torch.logspace(-3, 1, 50)[:, None]  # rows of very different scales
    codes, scale, lo = quant.quantize(w)
    assert codes.dtype == torch.uint8 and scale.shape == lo.shape == (50,)
    err = (quant.dequantize(codes, scale, lo) - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()
    assert (err.max(1).values / w.abs().max(1).values).max() < 0.01  # small rows keep their precision


def test_quantized_state_round_trips_and_leaves_other_tensors_alone():
    state = {"emb.weight": torch.randn(10, 8), "lin.bias": torch.randn(8), "narrow.weight": torch.randn(10, 1),
             "ids": torch.arange(5)}
    q = quant.quantize_state(state)
    assert set(q) == {"emb.weight.q8", "emb.weight.scale", "emb.weight.min", "lin.bias", "narrow.weight", "ids.i8"}
    assert q["ids.i8"].dtype == torch.int8 and back_dtype_is_int64(q)
    assert quant.is_quantized(q) and not quant.is_quantized(state)
    back = quant.dequantize_state(q)
    assert set(back) == set(state) and torch.equal(back["ids"], state["ids"])
    assert torch.allclose(back["emb.weight"], state["emb.weight"], atol=0.02)


def back_dtype_is_int64(q):
    return quant.dequantize_state(q)["ids"].dtype == torch.int64


# ------------------------------------------------------------------------------ pruning, choice
@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.integers(-(2 ** 40), 2 ** 40), max_size=20))
def test_integer_buffers_take_the_narrowest_type_that_holds_them_and_come_back_exact(values):
    t = torch.tensor(values, dtype=torch.long)
    (name, stored), = quant.narrow_ints({"ids": t}).items()
    top = max((abs(v) for v in values), default=0)
    want = next((d for d in (torch.int8, torch.int16, torch.int32) if top <= torch.iinfo(d).max), torch.int64)
    assert stored.dtype == want and name == ("ids" if want == torch.int64 else f"ids.i{torch.iinfo(want).bits}")
    back = quant.dequantize_state({name: stored})["ids"]
    assert back.dtype == torch.long and torch.equal(back, t)


def test_a_budget_per_task_overrides_the_default_one():
    cc = load_config(None, ["compress.max_relative_drop=0.01", "compress.task_budgets={intent: 0.03}"]).compress
    assert (cc.budget("intent"), cc.budget("ctr")) == (0.03, 0.01)


def test_the_smallest_variant_within_budget_is_kept():
    base = {"ctr": {"auc": 0.80}, "intent": {"macro_f1": 0.50}}
    drops = compress.relative_drops({"ctr": {"auc": 0.79}, "intent": {"macro_f1": 0.51}}, base)
    assert drops == pytest.approx({"ctr": 0.0125, "intent": -0.02})
    v = [{"name": "student", "bytes": 400, "drops": {"ctr": 0.0}, "within_budget": True},
         {"name": "student_int8", "bytes": 100, "drops": {"ctr": 0.008}, "within_budget": True},
         {"name": "student_units50_int8", "bytes": 100, "drops": {"ctr": 0.004}, "within_budget": True},
         {"name": "student_units10_int8", "bytes": 90, "drops": {"ctr": 0.2}, "within_budget": False}]
    assert compress.choose(v)["name"] == "student_units50_int8"


# ------------------------------------------------------------------------------ bundle
@pytest.fixture
def a_bundle(tmp_path, tiny_bert):
    import pyarrow as pa
    from distillery.models.teacher import load_backbone

    tok = load_backbone(tiny_bert)[1]
    out = tmp_path / "bundle"
    bundle.write(str(out), state=quant.quantize_state({"w": torch.randn(4, 8)}), tokenizer=tok,
                 config={"weights": "int8-rowwise"}, items=pa.table({"idx": [2], "item_id": ["a"]}),
                 metrics={"test": {}})
    return out


def test_a_written_bundle_verifies_and_lists_every_file(a_bundle, capsys):
    manifest = bundle.verify(str(a_bundle))
    assert set(bundle.REQUIRED) <= set(manifest["files"])
    assert all(len(f["sha256"]) == 64 for f in manifest["files"].values())
    assert cli.main(["verify", str(a_bundle)]) == 0 and "OK" in capsys.readouterr().out


def test_a_flipped_byte_a_missing_file_or_an_added_one_is_refused(a_bundle, capsys):
    weights = a_bundle / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    assert cli.main(["verify", str(a_bundle)]) == 1
    assert "model.safetensors: altered" in capsys.readouterr().err
    (a_bundle / "metrics.json").unlink()
    (a_bundle / "extra.bin").write_bytes(b"x")
    with pytest.raises(bundle.BundleError) as err:
        bundle.load(str(a_bundle))  # loading verifies
    assert "metrics.json: missing" in str(err.value) and "extra.bin: not in the manifest" in str(err.value)
    shutil.rmtree(a_bundle)
    assert cli.main(["verify", str(a_bundle)]) == 1


# ------------------------------------------------------------------------------ the stages
def _small(cfg):
    cfg = small_student(cfg)  # the distill test's student: after it, the distill stage here is a manifest match
    return cfg.model_copy(update={
        "tune": cfg.tune.model_copy(update={"num_samples": 3, "epochs": 2, "grace_period": 1}),
        "compress": cfg.compress.model_copy(update={"unit_keep": [0.5], "finetune_steps": 5, "max_relative_drop": 1.0,
                                                    "latency_requests": 10}),
        "report": cfg.report.model_copy(update={"latency_requests": 10})})


_TRIAL = tune._trial


def _second_trial_crashes(params, **kwargs):
    """The tune stage's trial function, except that the sweep's second trial raises at its start."""
    from ray import tune as ray_tune

    if tune._trial_dir_parts(ray_tune.get_context().get_trial_dir())[1] == 2:
        raise RuntimeError("fault injected into the second trial")
    return _TRIAL(params, **kwargs)


@pytest.fixture
def second_trial_crashes(monkeypatch):
    import ray.cloudpickle

    # the trial workers cannot import this test module: its functions travel by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    monkeypatch.setattr(tune, "_trial", _second_trial_crashes)
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.mark.integration
@pytest.mark.usefixtures("ray_local")
def test_sweep_compress_bundle_and_report_end_to_end(labelled, capfd, monkeypatch, tmp_path, request):
    cfg, run_dir = labelled
    cfg = _small(cfg)
    runner.run(cfg, ["distill"])
    request.getfixturevalue("second_trial_crashes")  # reported as failed, and the sweep goes on
    m = runner.run(cfg, ["tune"])["tune"]
    out = capfd.readouterr().out
    assert "[tune] best trial" in out
    rows = (run_dir / "tune" / "trials.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("trial_id,defaults,status,score,best_epoch,epochs_run")
    assert sum(r.split(",")[1] == "True" for r in rows[1:]) == 1  # the first trial ran the defaults
    assert sum(",failed," in r for r in rows) == 1 and "fault injected" in (run_dir / "tune" / "trials.csv").read_text()
    assert m["counts"] == {"trials": 3, "failed": 1}
    best = json.loads((run_dir / "tune" / "best.json").read_text())
    assert {"temperature", "alpha", "weight", "lr"} <= set(best["params"])
    assert best["winner"] == ("tune" if best["valid_score"] > best["distill_student_score"] else "distill")
    assert (run_dir / "tune" / "tune.png").read_bytes()[:4] == b"\x89PNG"
    assert (run_dir / "tune" / "best" / "model" / "model.safetensors").exists()

    c = runner.run(cfg, ["compress"])["compress"]
    variants = json.loads((run_dir / "compress" / "variants.json").read_text())
    names = ["student", "student_compact", "student_units50"]
    assert [v["name"] for v in variants] == names + [n + "_int8" for n in names]
    v = {r["name"]: r for r in variants}
    assert variants[0]["drops"] == {t: 0.0 for t in variants[0]["drops"]}
    assert v["student_compact"]["shape"]["item_text"] is False and v["student_compact"]["shape"]["text_rows_kept"] > 0
    assert v["student_units50"]["shape"]["text_dim"] == 4 and v["student_units50"]["params"] < v["student_compact"]["params"]
    assert v["student_compact"]["params"] < v["student"]["params"]
    for r in variants[1:]:  # each is smaller than the one it is made from
        assert r["bytes"] < v[r["parent"]]["bytes"] and r["smaller_or_faster"], r["name"]
        assert r["p50_ms"] > 0 and r["throughput_b256"] > 0
    assert v["student_int8"]["bytes"] < v["student"]["bytes"] / 2
    # with the budget opened wide, the smallest file; here an 8-bit one (the 4-wide pruned table is
    # below quant's 8 columns and stays float32, so it need not be the pruned variant)
    assert all(r["within_budget"] for r in variants)
    assert c["chosen"] == min(variants, key=lambda r: r["bytes"])["name"] and c["chosen"].endswith("_int8")
    assert cli.main(["verify", str(run_dir / "bundle")]) == 0
    config = json.loads((run_dir / "bundle" / "config.json").read_text())
    assert config["weights"] == "int8-rowwise" and config["variant"] == c["chosen"]
    assert config["spec"]["text_dim"] == v[c["chosen"]]["shape"]["text_dim"] and config["spec"]["item_text"] is False
    # compress took the student best.json names, and says where it came from
    assert config["source"].split()[0] == best["winner"]
    assert config["student_dir"].endswith("tune/best/model" if best["winner"] == "tune" else "distill/student/model")

    runner.run(cfg, ["report"])
    rep = json.loads((run_dir / "report" / "report.json").read_text())
    assert {"teacher", "student", "student_no_kd", c["chosen"]} <= set(rep["models"])
    assert rep["models"][c["chosen"]]["bytes"] < rep["models"]["student"]["bytes"]
    assert all(c["chosen"] in rep["tasks"][t] for t in rep["tasks"])
    assert {"tune", "compress"} <= set(rep)
    assert cli.main(["export", str(run_dir), str(tmp_path / "exported")]) == 0
    loaded = bundle.load(str(tmp_path / "exported"))
    assert loaded.spec == StudentSpec.from_json(config["spec"]) and loaded.config == config
    assert len(loaded.items) == loaded.spec.n_items - 2 and loaded.model.item.num_embeddings == loaded.spec.n_items
