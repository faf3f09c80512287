"""The teacher's sequence models (the SASRec baselines and the teacher's members): which of the
run's tasks they learn, their shape, an epoch's batches, their evaluation, and the training job of
one of them."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch

from .. import evaluation, loop, training
from ..config import RunConfig
from ..data.examples import read_items
from ..histories import pad_list_array
from ..layout import PartDir
from ..losses import MemberLoss
from ..models.seqrec import NextItemLoss, SeqSpec
from ..models.teacher import SeqMember, TeacherSpec, build_member, save_weights
from ..tasks import TASKS

NEXT_ITEM, CLICK = MemberLoss.TERMS
# the Train datasets of a run's sequence models: one row per user (its train clicks in order), and
# the click examples
SEQUENCES, IMPRESSIONS = "sequences", "impressions"


@dataclass(frozen=True)
class SequenceTasks:
    """The tasks a sequence model learns, by what it learns of them (`Task.sequence_target`): the
    next item of a user's clicks, and whether a user clicks a candidate."""
    next_item: str | None = None
    click: str | None = None

    @classmethod
    def of(cls, tasks: Iterable[str]) -> "SequenceTasks":
        by_target = {TASKS[t].sequence_target: t for t in tasks if TASKS[t].sequence_target}
        return cls(next_item=by_target.get(NEXT_ITEM), click=by_target.get(CLICK))

    @property
    def names(self) -> list[str]:
        return [t for t in (self.next_item, self.click) if t]

    def __bool__(self) -> bool:
        return bool(self.names)

    def scored_by(self) -> str:
        """The task whose score ranks the models: the next item's, else the click's."""
        return self.next_item or self.click

    @property
    def score_metric(self) -> str:
        return TASKS[self.scored_by()].score_metric

    def score(self, valid: dict) -> float:
        return valid[self.scored_by()][self.score_metric]

    def weights(self, cfg: RunConfig) -> dict[str, float]:
        """`MemberLoss`'s term weights: each task's `weight`."""
        return {term: TASKS[t].settings(cfg).weight for term, t in ((NEXT_ITEM, self.next_item), (CLICK, self.click))
                if t}


def history_window(cfg: RunConfig) -> int:
    """The longest history any sequence task reads (every model of a run shares it)."""
    return max(t.settings(cfg).max_history for t in TASKS.values() if t.sequence_target)


def click_history(cfg: RunConfig, tasks: SequenceTasks) -> int:
    return TASKS[tasks.click].settings(cfg).max_history if tasks.click else 1


def seq_spec(cfg: RunConfig, n_items: int, text_dim: int, *, dim: int, dropout: float,
             item_text: bool | None = None) -> SeqSpec:
    """A sequence model of this run at one point of a grid (`item_text=False`: the ID-only SASRec)."""
    sc = cfg.teacher.sequence
    use_text = sc.item_text if item_text is None else item_text
    return SeqSpec(n_items=n_items, dim=dim, layers=sc.layers, heads=sc.heads, dropout=dropout,
                   max_history=history_window(cfg), text_dim=text_dim if use_text else 0,
                   use_id=sc.item_ids or not use_text, adaptor_hidden=sc.adaptor_hidden if use_text else 0)


def evaluate_member(member: SeqMember, prepare_dir: str, split: str, tasks, n_items: int, max_history: int,
                    seed: int = 0, device="cpu") -> dict:
    """{task: metrics} of one sequence model on a split of `tasks`."""
    return evaluation.evaluate(evaluation.predictors(member, tasks, device=device), prepare_dir, split, n_items=n_items,
                               max_history=max_history, seed=seed)


def popularity(prepare_dir: str, n_items: int) -> list[float]:
    """Click counts + 1 per item id (the sampled softmax's proposal)."""
    counts = np.ones(n_items)
    items = read_items(prepare_dir)
    counts[2:] += items["clicks"].fillna(0).to_numpy(float) if "clicks" in items else 0
    return counts.tolist()


# ------------------------------------------------------------------------------ batches
def user_sequences(rec_train: pd.DataFrame) -> pa.Table:
    """One row per user: `sequence` = the user's train items in order (the history of the user's
    last train example, already cut to max_history by prepare, and its target). Example ids are
    prepare's `rec:{user}:{t}`, t = the target's position in the user's clicks."""
    schema = pa.schema([("user_id", pa.string()), ("sequence", pa.list_(pa.int32()))])
    if rec_train.empty:
        return schema.empty_table()
    t = rec_train["example_id"].str.rsplit(":", n=1).str[1].astype(np.int64)
    last = rec_train.assign(_t=t).sort_values(["user_id", "_t"]).groupby("user_id", sort=False).tail(1)
    seqs = [[*map(int, h), int(i)] for h, i in zip(last["history"], last["item"])]
    return pa.table({"user_id": last["user_id"].astype(str).tolist(), "sequence": seqs}, schema=schema)


def sequence_batches(seqs: torch.Tensor, ctr: dict | None, steps: int, ctr_batch: int, gen: torch.Generator,
                     device, per_target: bool = False) -> list[dict]:
    """One epoch: `steps` batches. Sequences are bucketed by length (sorted with jitter, then cut
    into `steps` chunks taken in random order), each batch trimmed to its longest sequence: with a
    median history of a few items, padding to max_history would be most of the compute. With
    `per_target`, a batch's `sequence_weight` is its next-item targets over the epoch's mean per
    batch, so that the weighted mean losses weigh every target alike. Click rows are drawn from a
    permutation of the shard."""
    out = [{} for _ in range(steps)]
    if seqs is not None and len(seqs):
        lengths = (seqs != 0).sum(1).float()
        order = torch.argsort(lengths + 4 * torch.rand(len(seqs), generator=gen))
        chunks = torch.tensor_split(order, steps)
        for i, j in enumerate(torch.randperm(steps, generator=gen).tolist()):
            s = seqs[chunks[j]]
            if len(s):
                longest = max(int((s != 0).sum(1).max()), 2)
                out[i]["sequences"] = s[:, -longest:].to(device)
        if per_target:
            targets = [int((b["sequences"][:, 1:] != 0).sum()) if "sequences" in b else 0 for b in out]
            mean = sum(targets) / steps
            for b, n in zip(out, targets):
                if n:
                    b["sequence_weight"] = n / mean
    if ctr is not None and len(ctr["label"]):
        n = len(ctr["label"])
        need = steps * min(ctr_batch, n)
        idx = torch.cat([torch.randperm(n, generator=gen) for _ in range(math.ceil(need / n))])[:need]
        for i, rows in enumerate(torch.split(idx, min(ctr_batch, n))):
            batch = {f"ctr_{k}": v[rows] for k, v in ctr.items()}
            longest = max(int((batch["ctr_history"] != 0).sum(1).max()), 1)
            batch["ctr_history"] = batch["ctr_history"][:, -longest:]  # left-padded: the padding goes
            out[i].update({k: v.to(device) for k, v in batch.items()})
    for b in out:
        b["generator"] = gen
    return out


def shards(tasks: SequenceTasks, sequence_length: int, ctr_history: int) -> tuple:
    """This Train worker's (padded train sequences [N, sequence_length] or None, click tensors or None)."""
    seqs = ctr = None
    if tasks.next_item and (t := training.read_shard(SEQUENCES, sort_by="user_id")) is not None:
        seqs = pad_list_array(t.column("sequence"), sequence_length)
    if tasks.click and (t := training.read_shard(IMPRESSIONS, sort_by="example_id")) is not None:
        ctr = {"history": pad_list_array(t.column("history"), ctr_history),
               "item": torch.from_numpy(t.column("item").to_numpy().astype(np.int64)),
               "slot": torch.from_numpy(pc.fill_null(t.column("slot"), -1).to_numpy().astype(np.int64)),
               "label": torch.from_numpy(t.column("label").to_numpy().astype(np.float32))}
    return seqs, ctr


# ------------------------------------------------------------------------------ the training job
def samples(cfg: RunConfig, spec: SeqSpec) -> bool:
    """Whether a model of this shape trains with a sampled softmax (`sampled_softmax_above`)."""
    return spec.n_items - 2 > cfg.teacher.sequence.sampled_softmax_above


def job(cfg: RunConfig, part, teacher_spec: TeacherSpec, worker: training.Worker, *, prepare_dir: str,
        item_text: torch.Tensor | None, proposal: list[float] | None, steps: int, seqs: torch.Tensor | None,
        ctr: dict | None) -> training.Job:
    """The training job of one sequence model (`grid.SequencePart`) on `worker`: `seqs` and `ctr`
    are the worker's shards (`shards`), `item_text` the frozen encoder's item embeddings (None
    without them), `proposal` the sampled softmax's (`popularity`), `steps` an epoch's batches."""
    sc, spec, tasks = cfg.teacher.sequence, part.spec, part.tasks
    torch.manual_seed(loop.epoch_seed(part.seed, 0, 0, stream=1))  # same initial weights on every rank
    text = item_text if spec.text_dim else None
    member = build_member(spec, teacher_spec, text, ctr_head=part.ctr_head and tasks.click is not None)
    seqs = None if seqs is None or not tasks.next_item else seqs[:, -(spec.max_history + 1):]
    ctr = ctr if tasks.click else None
    sampled = samples(cfg, spec)
    next_item = NextItemLoss(sc.negatives if sampled else 0,
                             torch.tensor(proposal, dtype=torch.float32) if sampled else None)
    # a click head alone must train the encoder under it
    loss = MemberLoss(member, next_item, tasks.weights(cfg), sc.ctr_trains_encoder or not tasks.next_item)
    device, per_target = worker.device, sc.weighting == "target"

    def validate():
        valid = evaluate_member(member, prepare_dir, "valid", tasks.names, spec.n_items, spec.max_history, cfg.seed,
                                device)
        return tasks.score(valid), valid

    def describe(entry: dict) -> str:
        v = entry["valid"]
        return "  ".join(f"{t}:{TASKS[t].score_metric}={v[t][TASKS[t].score_metric]:.4f}" for t in tasks.names if t in v)

    return training.Job(
        name=part.name, stage="teacher", model=member, loss=loss,
        optimizer=lambda m: torch.optim.AdamW(m.parameters(), lr=sc.lr, weight_decay=sc.weight_decay),
        schedule=lambda optim: torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 1.0),
        plan=loop.Plan(epochs=sc.epochs, patience=sc.patience, eval_every=sc.eval_every, clip=5.0, seed=part.seed),
        batches=lambda gen: sequence_batches(seqs, ctr, steps, sc.ctr_batch_size, gen, device, per_target),
        validate=validate, save=lambda: save_weights(member, PartDir(part.out_dir).weights),
        history=PartDir(part.out_dir).history, describe=describe, detail=f"{sc.eval_every} epochs")
