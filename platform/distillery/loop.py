"""The one epoch loop of every trainer (teacher members, intent encoder, students), without Ray:
steps, clipping, validation, early stopping.

`fit` owns the loop; the caller owns the parts: a function that yields an epoch's batches, one that
turns a batch into losses, one that validates, and a hook called after every validation (the Ray
Train adapters checkpoint and report there; tests just record). Runnable in a plain process.

Early stopping: validation every `eval_every` epochs; the run stops once `patience` validations in
a row have not beaten the best score. Every random draw of an epoch (batch order, dropout) is
seeded from (seed, epoch, rank), so a run resumed from a checkpoint repeats an uninterrupted one.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch


def epoch_seed(seed: int, epoch: int, rank: int = 0, stream: int = 0) -> int:
    """A 63-bit seed for one (run seed, epoch, rank, stream); distinct tuples give unrelated streams
    (stream 1: initial weights, 0: the epochs)."""
    entropy = [seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, epoch, rank, stream]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(1))


@dataclass
class Plan:
    epochs: int          # most epochs
    patience: int        # validations without a new best before stopping
    eval_every: int = 1  # epochs between validations (the last epoch is always validated)
    clip: float = 1.0    # gradient norm
    clip_per_group: bool = True  # clip each optimizer group apart (a fine-tuned encoder beside fresh heads)
    seed: int = 0
    rank: int = 0


def new_state() -> dict:
    return {"epoch": 0, "best": -float("inf"), "bad_epochs": 0, "history": []}


def fit(model: torch.nn.Module, optim: torch.optim.Optimizer, sched, plan: Plan, *,
        batches: Callable[[torch.Generator], Iterable], loss: Callable[[object], dict],
        validate: Callable[[], tuple[float, dict]], on_validated: Callable[[dict, bool], None],
        state: dict | None = None, autocast=None, log: Callable[[int, dict, bool], None] | None = None) -> dict:
    """Train until `plan.epochs` or early stop; returns the state (history, best score).

    batches(generator) yields the epoch's batches; loss(batch) -> {name: tensor, "total": tensor};
    validate() -> (score, metrics), higher score is better; on_validated(state, improved) runs after
    each validation (save the best model, checkpoint). `state` resumes a checkpointed run."""
    from . import trainstate

    state = state or new_state()
    if state["bad_epochs"] >= plan.patience:  # resumed from the checkpoint of a run that had already stopped
        return state
    autocast = autocast or torch.autocast("cpu", enabled=False)
    for epoch in range(state["epoch"], plan.epochs):
        t0 = time.perf_counter()
        seed = epoch_seed(plan.seed, epoch, plan.rank)
        torch.manual_seed(seed)  # dropout draws from the global generator
        gen = torch.Generator().manual_seed(seed)
        model.train()
        sums, n = state.setdefault("_sums", {}), state.get("_steps", 0)
        for batch in batches(gen):
            with autocast:
                losses = loss(batch)
            optim.zero_grad(set_to_none=True)
            losses["total"].backward()
            if plan.clip and plan.clip_per_group:
                for group in optim.param_groups:
                    torch.nn.utils.clip_grad_norm_(group["params"], plan.clip)
            elif plan.clip:
                torch.nn.utils.clip_grad_norm_([p for g in optim.param_groups for p in g["params"]], plan.clip)
            optim.step()
            if sched is not None:
                sched.step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            n += 1
        state["_steps"] = n
        state["_seconds"] = state.get("_seconds", 0.0) + time.perf_counter() - t0
        if (epoch + 1) % plan.eval_every and epoch + 1 < plan.epochs:
            state["epoch"] = epoch + 1
            continue
        model.eval()
        with torch.no_grad():
            score, valid = validate()
        seconds = state.pop("_seconds") + time.perf_counter() - t0
        improved = trainstate.record_epoch(state, epoch, score, valid, state.pop("_sums"), state.pop("_steps"), seconds)
        if log is not None:
            log(epoch, state["history"][-1], improved)
        on_validated(state, improved)
        if state["bad_epochs"] >= plan.patience:
            break
    return state
