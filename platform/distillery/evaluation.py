"""One evaluation loop for every model (teacher, students, compressed variants): the model comes in
as predictor functions per task, the examples and the metrics are the same for all of them. What a
task's predictor takes and returns is the task's (`tasks/`, each module's `outputs`), e.g.

    predictors = {"recommendation": f(history [b, H]) -> scores [b, n_items] (numpy),
                  "ctr": f(history [b, H], item [b], slot [b]) -> click probabilities [b] (numpy),
                  "intent": f(texts: list[str]) -> predicted class ids [b] (numpy)}
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from . import metrics as M
from .tasks import TASKS, Output, get


def _known(tasks) -> list[str]:
    """`tasks` in the registry's order; a name the registry lacks is an error (`tasks.get`), never skipped."""
    for t in tasks:
        get(t)
    return [t for t in TASKS if t in tasks]


@torch.no_grad()
def predictors(model, tasks, text_logits: Callable | None = None, device="cpu") -> dict[str, Callable]:
    """{task: predictor} of any model (teacher, a teacher member, student) with `item_vectors()`,
    `rec_scores(history, items)` and `ctr_logits(history, item, slot, items)` as its tasks need, and
    `text_logits(task, texts)` -> [B, C] logits for the text classification tasks (`text_scorer` of
    `models.teacher` and `models.student`). Item vectors are computed once, here."""
    model.eval()
    items = model.item_vectors() if hasattr(model, "item_vectors") else None
    return {t: TASKS[t].predictor(model, items, text_logits, device) for t in _known(tasks)}


def teacher_predictors(model, tokenizer, tasks, max_length: int, device="cpu") -> dict[str, Callable]:
    from .models.teacher import text_scorer

    return predictors(model, tasks, text_scorer(model, tokenizer, max_length, device), device)


def student_predictors(model, tokenizer, spec, tasks, device="cpu") -> dict[str, Callable]:
    from .models.student import text_scorer

    return predictors(model, tasks, text_scorer(model, tokenizer, spec, device), device)


@torch.no_grad()
def outputs(predictors: dict[str, Callable], prepare_dir: str, split: str, *, n_items: int, max_history: int,
            seed: int = 0, batch: int = 512) -> dict[str, Output]:
    """{task: its per-example outputs on one split} for the tasks in `predictors` (`metrics_of`
    turns them into metrics; `ratio_intervals` compares two models' on any subset of rows)."""
    return {t: TASKS[t].outputs(predictors[t], prepare_dir, split, n_items=n_items, max_history=max_history,
                                seed=seed, batch=batch) for t in _known(predictors)}


def metrics_of(outputs: dict[str, Output]) -> dict:
    """`outputs`' per-example arrays -> {task: {metric: value}} (the metric module's names)."""
    return {t: TASKS[t].metrics_of(outputs[t]) for t in _known(outputs)}


def ratio_intervals(model: dict, reference: dict, *, resamples: int = 1000, level: float = 0.95,
                    seed: int = 0) -> dict[str, dict]:
    """{task: `metrics.paired_ratio_interval` of model / reference on the task's score metric} over the
    tasks both `outputs` (of the same split) hold: e.g. how much of the teacher a student keeps,
    with how much of that the test split's size leaves uncertain."""
    out = {}
    for t in _known([t for t in model if t in reference]):
        if not np.array_equal(model[t]["unit"], reference[t]["unit"]):
            raise ValueError(f"{t}: the two models' outputs are not of the same examples")
        task = TASKS[t]
        out[t] = {"metric": task.score_metric,
                  **M.paired_ratio_interval(task.row_scorer(model[t]), task.row_scorer(reference[t]), model[t]["unit"],
                                            resamples=resamples, level=level, seed=seed)}
    return out


def evaluate(predictors: dict[str, Callable], prepare_dir: str, split: str, *, n_items: int, max_history: int,
             seed: int = 0, batch: int = 512) -> dict:
    """{task: {metric: value}} on one split, for the tasks in `predictors`."""
    return metrics_of(outputs(predictors, prepare_dir, split, n_items=n_items, max_history=max_history,
                              seed=seed, batch=batch))
