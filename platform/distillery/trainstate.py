"""What the Ray Train stages (teacher, distill) share around their epoch loop: the learning-rate
schedule, and the per-epoch checkpoint that Train V2 hands back when a stage is re-run."""
from __future__ import annotations

import json
import math
import os
import tempfile

import torch


def warmup_linear(optim: torch.optim.Optimizer, total_steps: int, warmup_ratio: float):
    """Linear warmup over `warmup_ratio` of the steps, then linear decay to 0."""
    warmup = int(warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: (s + 1) / max(1, warmup) if s < warmup
        else max(0.0, (total_steps - s) / max(1, total_steps - warmup)))


def restore(model: torch.nn.Module, optim, sched, part: str | None = None) -> dict | None:
    """Load the latest checkpoint of this Train run into model, optimizer and scheduler; its state
    dict, or None on a fresh start. Weights through safetensors, the rest with weights_only=True.
    With `part`, a run that trains several models in turn: a checkpoint another part wrote (its
    state's "part") is not this one's, and this part starts fresh."""
    import ray.train
    from safetensors.torch import load_file

    ck = ray.train.get_checkpoint()
    if not ck:
        return None
    with ck.as_directory() as d:
        with open(os.path.join(d, "state.json")) as f:
            state = json.load(f)
        if part is not None and state.get("part") != part:
            return None
        model.load_state_dict(load_file(os.path.join(d, "model.safetensors")))
        optim.load_state_dict(torch.load(os.path.join(d, "optimizer.pt"), weights_only=True))
        sched.load_state_dict(torch.load(os.path.join(d, "scheduler.pt"), weights_only=True))
    # counted in the state so each history entry says how many restarts preceded it
    state["restarts"] = state.get("restarts", 0) + 1
    return state


def record_epoch(state: dict, epoch: int, score: float, valid: dict, sums: dict, steps: int, seconds: float) -> bool:
    """Append the epoch to state["history"] (mean losses over `steps`, and how many times the run
    was restored from a checkpoint before it), advance the epoch, best score and patience counter;
    True when the score is a new best."""
    # a validation split too small to score any task (NaN) still keeps the first model as the best
    improved = score > state["best"] or (not state["history"] and math.isnan(score))
    state["history"].append({"epoch": epoch, "score": score, "loss": {k: v / max(steps, 1) for k, v in sums.items()},
                             "valid": valid, "seconds": round(seconds, 1), "restarts": state.get("restarts", 0)})
    best = state["best"] if math.isnan(score) else max(score, state["best"])
    state.update(epoch=epoch + 1, best=best, bad_epochs=0 if improved else state["bad_epochs"] + 1)
    return improved


def report_epoch(model: torch.nn.Module, optim, sched, state: dict, metrics: dict, rank: int) -> None:
    """`ray.train.report(metrics)` with a checkpoint written by rank 0 (every rank must report)."""
    import ray.train
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:
            save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
                      os.path.join(d, "model.safetensors"))
            torch.save(optim.state_dict(), os.path.join(d, "optimizer.pt"))
            torch.save(sched.state_dict(), os.path.join(d, "scheduler.pt"))
            with open(os.path.join(d, "state.json"), "w") as f:
                json.dump(state, f)
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint)
