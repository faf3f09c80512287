"""The task interface: the registry matches the config, every task fills the interface, the
evaluation loop runs any task it is given (a minimal fake one here), and no module outside `tasks/`
and the config names a task."""
import ast
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from distillery import evaluation, tasks
from distillery.config import TASK_NAMES, RunConfig
from distillery.tasks import TASKS, Task

PKG = Path(__file__).resolve().parents[1] / "platform" / "distillery"



def test_the_registry_is_the_configs_task_sections_in_order():
    assert tuple(TASKS) == TASK_NAMES == tuple(type(RunConfig().tasks).model_fields)
    assert all(t.name == name for name, t in TASKS.items())
    assert tasks.SCORE_METRIC == {name: t.score_metric for name, t in TASKS.items()}


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_fills_the_interface(name):
    task = TASKS[name]
    required = ("fingerprints", "label", "tensors", "forward", "loss", "predictor", "outputs", "metrics_of",
                "row_scorer", "baselines", "probe_request", "probe") + (() if task.per_user else ("prepare",))
    missing = [m for m in required if getattr(type(task), m) is getattr(Task, m)]
    assert not missing, f"{name} does not implement {missing}"
    assert task.score_metric in task.metrics
    assert set(task.example_columns) >= {"example_id"} and task.teacher_inputs
    assert task.label_schema.names == ["example_id", "split", *task.label_columns, "fingerprint"]
    assert set(task.train_splits) <= set(task.label_splits)
    cfg = RunConfig()
    assert task.settings(cfg) is getattr(cfg.tasks, name)
    for knob in task.tuned:  # a task's own sweep knobs are fields of its config section and of tune.space
        assert knob in type(task.settings(cfg)).model_fields and knob in type(cfg.tune.space).model_fields


class Parity(Task):
    """A minimal task: is an integer even? Enough of the interface for evaluation."""
    name = "parity"
    score_metric = "accuracy"
    metrics = ("accuracy",)

    def outputs(self, predict, prepare_dir, split, *, n_items, max_history, seed, batch):
        x = np.arange(10)
        return {"label": x % 2, "prediction": predict(x), "unit": x}

    def metrics_of(self, output):
        return {"accuracy": float((output["label"] == output["prediction"]).mean())}

    def row_scorer(self, output):
        return lambda rows: float((output["label"][rows] == output["prediction"][rows]).mean())


def test_the_evaluation_loop_runs_whatever_task_it_is_given(monkeypatch):
    monkeypatch.setitem(TASKS, "parity", Parity())
    always_odd, right = (lambda x: np.ones_like(x)), (lambda x: x % 2)
    assert evaluation.evaluate({"parity": always_odd}, "unused", "test", n_items=0, max_history=1) == \
        {"parity": {"accuracy": 0.5}}
    model = evaluation.outputs({"parity": always_odd}, "unused", "test", n_items=0, max_history=1)
    reference = evaluation.outputs({"parity": right}, "unused", "test", n_items=0, max_history=1)
    interval = evaluation.ratio_intervals(model, reference, resamples=50)["parity"]
    assert interval["metric"] == "accuracy" and interval["ratio"] == 0.5 and interval["units"] == 10


def test_a_task_the_registry_lacks_is_an_error_not_skipped():
    with pytest.raises(KeyError, match="no task 'parity'"):
        evaluation.evaluate({"parity": lambda x: x}, "unused", "test", n_items=0, max_history=1)
    with pytest.raises(KeyError, match="the tasks are recommendation, ctr, intent"):
        tasks.get("parity")


def test_label_schemas_are_what_the_label_stage_writes():
    rec = TASKS["recommendation"].label_schema
    assert rec.field("top_ids").type == pa.list_(pa.int32()) and rec.field("fingerprint").type == pa.int64()
    assert TASKS["intent"].label_splits[-1] == "transfer" and "transfer" in TASKS["intent"].train_splits


# ------------------------------------------------------------------------------ no task names elsewhere
def _named_tasks(path: Path) -> list[tuple[int, str]]:
    """(line, name) of every string constant equal to a task name, docstrings left out."""
    tree = ast.parse(path.read_text())
    docs = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return sorted((n.lineno, n.value) for n in ast.walk(tree)
                  if isinstance(n, ast.Constant) and n.value in TASKS and id(n) not in docs)


def _outside_tasks():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        if not rel.startswith("tasks/") and rel != "config.py":
            yield rel, path


def test_no_module_outside_tasks_and_the_config_names_a_task():
    named = {rel: _named_tasks(path) for rel, path in _outside_tasks()}
    offenders = {rel: hits for rel, hits in named.items() if hits}
    assert not offenders, ("these modules name a task; ask the task instead (`distillery.tasks`): "
                           + "; ".join(f"{rel} lines {[line for line, _ in hits]}" for rel, hits in offenders.items()))


def test_the_name_scanner_sees_comparisons_and_keys_but_not_docstrings(tmp_path):
    src = tmp_path / "m.py"
    src.write_text('"""recommendation"""\ndef f(task, d):\n    """ctr"""\n    if task == "intent":\n'
                   '        return d["ctr"]\n    return task in ("recommendation",)\n')
    assert _named_tasks(src) == [(4, "intent"), (5, "ctr"), (6, "recommendation")]


# ------------------------------------------------------------------------------ review sentiment
def test_review_classes_follow_the_rating_and_reviews_without_rating_or_text_are_left_out():
    import pandas as pd
    from distillery.tasks.sentiment import review_pairs

    batch = pd.DataFrame({"rating": [1.0, 2.0, 3.0, 4.0, 5.0, None, 2.5, 4.0],
                          "title": ["Awful", "Meh", None, "Good", "  ", "No stars", "Hm", None],
                          "text": ["Broke.", None, "It is fine", "Works  WELL", "Love it", "x", "ok", None]})
    got = review_pairs(batch, negative_max=2.0, positive_min=4.0).to_pylist()
    assert got == [{"text": "awful. broke.", "label": "negative"}, {"text": "meh", "label": "negative"},
                   {"text": "it is fine", "label": "neutral"}, {"text": "good. works well", "label": "positive"},
                   {"text": "love it", "label": "positive"}, {"text": "hm. ok", "label": "neutral"}]
    stricter = review_pairs(batch, negative_max=1.0, positive_min=5.0).to_pylist()
    assert [r["label"] for r in stricter] == ["negative", "neutral", "neutral", "neutral", "positive", "neutral"]


def test_sentiment_is_a_text_classification_task_with_its_own_endpoint():
    task = TASKS["sentiment"]
    assert task.classifies and task.reads_text and task.endpoint == "/v1/sentiment" and task.demo_texts
    assert task.train_splits == ("train",) and task.label_splits == ("train", "valid", "test")
    assert not RunConfig().tasks.sentiment.enabled  # it needs reviews with ratings: on where the data has them
    with pytest.raises(ValueError, match="negative_max"):
        RunConfig.model_validate({"tasks": {"sentiment": {"negative_max": 4, "positive_min": 4}}})


def test_sentiment_without_reviews_stops_and_names_the_setting():
    from distillery.errors import DataError
    from distillery.tasks.base import PrepareInputs

    inputs = PrepareInputs(cfg=RunConfig(), data=RunConfig().data, out=None, interactions=None, reviews=None,
                           items=None, item_ids=np.array([]), clicks=None, real_impressions=False)
    with pytest.raises(DataError, match="set data.reviews=PATH, or tasks.sentiment.enabled=false"):
        TASKS["sentiment"].prepare(inputs)
