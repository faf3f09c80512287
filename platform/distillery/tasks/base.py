"""What a task is to the pipeline: one object per task (`Task`), holding everything about the task
that the stages, the evaluation and the report need, so that they loop over the run's tasks instead
of asking which task they hold.

A task knows
- its examples: how they are built from the validated data (`prepare`, or the shared per-user pass
  for `per_user` tasks) and what was left out (`left_out`);
- its labels: the columns the teacher reads (`teacher_inputs`) and those a training
  example needs (`example_columns`), the splits it labels and trains on, the teacher's label columns
  (`label_fields`, `label_schema`) and how the teacher makes them (`label`), and a fingerprint of what
  the teacher sees of an example (`fingerprints`);
- its distillation: the joined train table's extra columns (`training_table`), the rows each student
  variant trains on (`training_rows`), the tensors of a worker's shard (`tensors`), the arguments of
  its loss from a student and a batch (`forward`), and the loss module itself (`loss`);
- its evaluation: per-example outputs on a split (`outputs`), their metrics (`metrics_of`), the metric
  over any subset of rows (`row_scorer`, for a bootstrap), the metric that ranks models
  (`score_metric`), the report's columns (`metrics`) and the simple baselines (`baselines`);
- which part of the teacher learns it: the sequence models (`sequence_target`) or a text classifier
  of its own (`classifies`);
- its latency probe: one request's payload and how a server answers a batch (`probe_request`, `probe`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn

from ..data.examples import SPLITS

if TYPE_CHECKING:
    from ..config import RunConfig
    from ..models.teacher import TeacherModel


Predictor = Callable[..., np.ndarray]  # a model's answers to one batch of a task's inputs (numpy)
Output = dict[str, np.ndarray]         # a task's per-example outputs on one split; "unit" is always there

BOOKKEEPING = (pa.field("example_id", pa.string()), pa.field("split", pa.string()))


@dataclass(frozen=True)
class PrepareInputs:
    """What a task's `prepare` builds its examples from: the validated log and reviews (lazy Ray
    Datasets), the catalogue in vocabulary order (`items`, with `item_ids` its sorted ids), each
    item's click count and whether the log has real impressions (non-clicks)."""
    cfg: "RunConfig"
    data: Any                     # config.DataConfig: the inputs read (the generated shop's paths for synthetic)
    out: Any                      # layout.PrepareDir: where examples and vocabularies go
    interactions: Any             # ray.data.Dataset
    reviews: Any                  # ray.data.Dataset, or None without reviews
    items: Any                    # pandas.DataFrame
    item_ids: np.ndarray
    clicks: Any                   # pandas.Series: clicks per item id
    real_impressions: bool


@dataclass(frozen=True)
class Prepared:
    """A task's examples as `prepare` wrote them: rows per split, and what it reports of them."""
    counts: dict[str, int]
    info: dict


@dataclass(frozen=True)
class LabelContext:
    """What a task's `label` needs besides the teacher and the batch: the run's config, the teacher's
    tokenizer and spec, its item vectors (computed once per worker) and the device."""
    cfg: "RunConfig"
    tokenizer: Any
    spec: Any
    items: Any
    device: Any


class Task:
    """One task of the multi-task student. Subclasses fill the class attributes and the methods."""

    name: ClassVar[str]
    score_metric: ClassVar[str]                  # ranks models: early stopping, grids, sweeps, budgets
    metrics: ClassVar[tuple[str, ...]]           # the report's columns, in order
    teacher_inputs: ClassVar[tuple[str, ...]]    # example columns the teacher reads when labelling
    example_columns: ClassVar[tuple[str, ...]]   # example columns a training example needs
    label_fields: ClassVar[tuple[pa.Field, ...]]  # the teacher's label columns
    label_splits: ClassVar[tuple[str, ...]] = SPLITS  # every split the teacher labels
    train_splits: ClassVar[tuple[str, ...]] = ("train",)  # the splits a student trains on
    reads_text: ClassVar[bool] = False           # inputs are texts: labelled in text-sized batches
    tuned: ClassVar[tuple[str, ...]] = ()        # `tune.space` fields that are this task's own knobs
    classifies: ClassVar[bool] = False           # answers with one of its classes (`labels`)

    per_user: ClassVar[bool] = False             # examples come from the one pass over each user's clicks
    # what the teacher's sequence models learn for this task: "next_item" (the next click of a
    # user's sequence) or "click" (a candidate's click head); None: the task has a teacher of its own
    sequence_target: ClassVar[str | None] = None

    # ---------------------------------------------------------------- examples
    def prepare(self, inputs: PrepareInputs) -> Prepared:
        """Write this task's examples under `inputs.out.examples(name, split)` (and its class names,
        for a classifying task). Per-user tasks are built together instead (`tasks.user_examples`)."""
        raise NotImplementedError

    def left_out(self, info: dict) -> list[str]:
        """Lines for prepare's report of what this task's examples left out (`Prepared.info`)."""
        return []

    # ---------------------------------------------------------------- config and labels
    def settings(self, cfg: "RunConfig"):
        """This task's section of the run config (`tasks.<name>`)."""
        return getattr(cfg.tasks, self.name)

    @property
    def label_columns(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.label_fields)

    @property
    def label_schema(self) -> pa.Schema:
        """A label part's schema: the example's id and split, the labels, the fingerprint."""
        return pa.schema([*BOOKKEEPING, *self.label_fields, pa.field("fingerprint", pa.int64())])

    def fingerprints(self, batch: pa.Table) -> pa.Array:
        """[B] int64: a hash of what the teacher sees of each example (not its id, user or split), so an
        example that a new window of data repeats keeps its fingerprint."""
        raise NotImplementedError

    def label(self, teacher: "TeacherModel", batch: pa.Table, ctx: LabelContext) -> dict[str, pa.Array]:
        """The teacher's label columns (`label_fields`) of one batch of examples."""
        raise NotImplementedError

    # ---------------------------------------------------------------- distillation
    def training_table(self, table: pa.Table, tokenizer, spec) -> pa.Table:
        """The joined train table (examples and labels) as the workers read it: a task adds columns
        that are cheaper made once than every step (the default adds none)."""
        return table

    def training_rows(self, table: pa.Table, kd: bool) -> pa.Table:
        """The rows a student trains on: kd=False is the no-distillation baseline, which cannot use
        rows that only the teacher labelled (the default: every row)."""
        return table

    def loss_context(self, table: pa.Table, spec) -> Any:
        """What the loss needs from the whole train table, computed once on the driver (default: none)."""
        return None

    def tensors(self, table: pa.Table, spec) -> dict[str, torch.Tensor]:
        """A worker's train rows -> tensors indexed by example (their first dimension)."""
        raise NotImplementedError

    def forward(self, model, batch: dict[str, torch.Tensor], items: torch.Tensor) -> tuple:
        """(student, a batch of `tensors`' rows, the student's item vectors) -> the loss's arguments."""
        raise NotImplementedError

    def loss(self, cfg: "RunConfig", kd: bool, context: Any = None) -> nn.Module:
        """The task's loss module with the run's settings; kd=False: the no-distillation baseline
        (alpha 0). `context`: `loss_context`'s value."""
        raise NotImplementedError

    def labels(self, prepare_dir: str) -> tuple[str, ...]:
        """A classifying task's class names in class-id order (others: none)."""
        return ()

    # ---------------------------------------------------------------- evaluation
    def predictor(self, model, items, text_logits, device) -> Predictor:
        """The model's predictor of this task (what `outputs` calls; `evaluation.predictors`): `items`
        are the model's item vectors, computed once; text_logits(task, texts) -> [B, C] its logits."""
        raise NotImplementedError

    def outputs(self, predict: Predictor, prepare_dir: str, split: str, *, n_items: int, max_history: int,
                seed: int, batch: int) -> Output:
        """Per-example outputs of a model (its predictor of this task) on one split."""
        raise NotImplementedError

    def metrics_of(self, output: Output) -> dict[str, float]:
        raise NotImplementedError

    def row_scorer(self, output: Output) -> Callable[[np.ndarray], float]:
        """-> f(rows) = `score_metric` over those rows of `output` (rows may repeat)."""
        raise NotImplementedError

    def baselines(self, prepare_dir: str, split: str, seed: int) -> dict[str, dict[str, float]]:
        """{baseline name: metrics} of the simple models every model of this task must beat."""
        raise NotImplementedError

    # ---------------------------------------------------------------- latency (`latency.py`)
    def probe_request(self, row) -> Any:
        """One request's payload for this task from a row of its test examples (a pandas row)."""
        raise NotImplementedError

    def probe(self, model, payloads: list) -> None:
        """Answer a batch of payloads as a server would, inputs built inside (what is timed). `model`
        has `histories(id lists, length)`, `rec_history`, `ctr_history`, `rec_scores(history)`,
        `ctr_logits(history, item, slot)` and `text_logits(task, texts)`."""
        raise NotImplementedError


# ------------------------------------------------------------------------------ arrow helpers
def fixed_list(values: np.ndarray, dtype: pa.DataType) -> pa.ListArray:
    """[B, K] array -> list<dtype> column of length-K lists."""
    b, k = values.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(0, b * k + 1, k, dtype=np.int32)),
                                    pa.array(values.reshape(-1), dtype))


def column_tensor(t: pa.Table, col: str, dtype) -> torch.Tensor:
    return torch.from_numpy(t.column(col).to_numpy().astype(dtype))


def stacked(t: pa.Table, col: str, dtype) -> torch.Tensor:
    """list column of equal-length lists -> [N, K]."""
    arr = t.column(col).combine_chunks()
    flat = pc.list_flatten(arr).to_numpy().astype(dtype)
    return torch.from_numpy(flat.reshape(len(arr), -1) if len(arr) else flat.reshape(0, 0))
