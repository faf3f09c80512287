"""The tasks of the multi-task student, one module each (`base.Task` says what a task holds), and
the registry the stages loop over. A task's name is its config section (`tasks.<name>`), its module
here (which defines `TASK`, its `Task`), its examples' and labels' folder name and its key in every
metrics dict.

Adding a task: a module `tasks/<name>.py` with a `Task` subclass and `TASK`, and its section in
`config.TasksConfig` (ARCHITECTURE.md, "Adding a task").
"""
from __future__ import annotations

import importlib
import math

import numpy as np

from ..config import TASK_NAMES
from .base import LabelContext, Output, Task

# one module per config section, in the config's order: the order the stages print and report in
TASKS: dict[str, Task] = {name: importlib.import_module(f"{__name__}.{name}").TASK for name in TASK_NAMES}

# the metric that ranks each task's models (early stopping, the teacher's grids, sweeps, budgets)
SCORE_METRIC: dict[str, str] = {name: t.score_metric for name, t in TASKS.items()}


def get(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"no task {name!r}: the tasks are {', '.join(TASKS)}") from None


def mean_metric(valid: dict) -> float:
    """Mean over tasks of their score metric: how the teacher stage summarizes a model it trains (its
    manifest's `valid_mean_metric`)."""
    vals = [valid[t][m] for t, m in SCORE_METRIC.items() if t in valid and not math.isnan(valid[t][m])]
    return float(np.mean(vals)) if vals else float("nan")


def teacher_relative_score(valid: dict, teacher_valid: dict) -> float:
    """Mean over tasks of student metric / teacher metric: the students' early-stopping and sweep
    score (`valid_score` in the distill and tune outputs). Tasks the teacher scores 0 or NaN on
    are left out."""
    ratios = [valid[t][m] / teacher_valid[t][m] for t, m in SCORE_METRIC.items()
              if t in valid and t in teacher_valid and teacher_valid[t][m]
              and not math.isnan(valid[t][m]) and not math.isnan(teacher_valid[t][m])]
    return float(np.mean(ratios)) if ratios else float("nan")


def baselines(prepare_dir: str, tasks, split: str = "test", seed: int = 0) -> dict[str, dict[str, dict]]:
    """{task: {baseline: metrics}} for `tasks` on one split."""
    return {t: TASKS[t].baselines(prepare_dir, split, seed) for t in TASKS if t in tasks}


__all__ = ["TASKS", "SCORE_METRIC", "Task", "LabelContext", "Output", "get", "mean_metric",
           "teacher_relative_score", "baselines"]
