"""How every trainer runs: one per-worker setup around `loop.fit` (the teacher's sequence models and
text classifiers, the students), and the one place a Ray Train `TorchTrainer` is built.

A trainer describes a job (`Job`): its model and loss, its optimizer and schedule, its epochs
(`loop.Plan`), its batches, its validation and how to save its best model. `run` does the rest the
same way for every trainer: the model onto the worker's device before its optimizer (a restored
optimizer state follows its parameters' device), the last checkpoint restored, DDP across ranks,
bf16 autocast on a GPU, each new best validation saved by rank 0, every epoch reported with a
checkpoint, one progress line per validation, the history written at the end.

Where a job runs is a `Worker`: `RayWorker` inside a Ray Train worker (checkpoints and reports
through `ray.train`), `LocalWorker` in a plain process (tests, a notebook), where nothing is
checkpointed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from . import loop, storage, trainstate
from .progress import say


class Worker:
    """Where a job runs: this process's rank among `world` ranks and its device."""
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    def restore(self, model: nn.Module, optim, sched, part: str) -> dict | None:
        """The loop state of `part`'s last checkpoint, loaded into model, optimizer and schedule; None
        on a fresh start."""
        return None

    def report(self, model: nn.Module, optim, sched, state: dict, metrics: dict) -> None:
        """Hand one validated epoch (and, from rank 0, a checkpoint) to whoever runs the job."""

    def wrap(self, loss: nn.Module) -> nn.Module:
        """The loss module the ranks train together (DDP with more than one rank)."""
        return loss


class LocalWorker(Worker):
    """One plain process on `device`: no checkpoints, nothing reported."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)


class RayWorker(Worker):
    """This Ray Train worker: its rank, its device (a GPU when the run asked for one), checkpoints
    through `ray.train`."""

    def __init__(self):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def restore(self, model, optim, sched, part):
        return trainstate.restore(model, optim, sched, part=part)

    def report(self, model, optim, sched, state, metrics):
        trainstate.report_epoch(model, optim, sched, state, metrics, self.rank)

    def wrap(self, loss):
        import ray.train.torch

        if self.world == 1:
            return loss
        # heads a batch leaves unused (a task absent from a step, a frozen path) must not stall DDP
        return ray.train.torch.prepare_model(loss, parallel_strategy_kwargs={"find_unused_parameters": True})


@dataclass
class Job:
    """One model to train: what differs between trainers. `loss(batch)` returns {name: tensor,
    "total": tensor} and holds `model` (so that one module is what DDP synchronizes); `validate()`
    returns (score, metrics), higher is better; `save()` writes `model` as the job's output."""
    name: str                                        # in progress lines and checkpoints
    stage: str                                       # the progress lines' prefix
    model: nn.Module
    loss: nn.Module
    optimizer: Callable[[nn.Module], torch.optim.Optimizer]  # of the model, once it is on its device
    schedule: Callable[[torch.optim.Optimizer], object]
    plan: loop.Plan
    batches: Callable[[torch.Generator], Iterable]
    validate: Callable[[], tuple[float, dict]]
    save: Callable[[], None]
    history: str                                     # where the history is written when the job ends
    describe: Callable[[dict], str] = lambda entry: ""  # a validated epoch (history entry) in its progress line
    metrics: Callable[[dict], dict] = lambda valid: {}  # its validation metrics as reported (Tune reads these)
    detail: str = ""                                 # the progress line's last words, e.g. "120 steps"


@dataclass(frozen=True)
class Best:
    """A finished job's best validation, from its history: metrics, score, the epoch that reached it
    (1-based) and how many epochs ran."""
    valid: dict
    score: float
    best_epoch: int
    epochs_run: int

    @classmethod
    def of(cls, history: list[dict]) -> "Best":
        best = max(history, key=lambda h: h["score"])
        return cls(best["valid"], best["score"], best["epoch"] + 1, history[-1]["epoch"] + 1)

    @classmethod
    def read(cls, path: str) -> "Best":
        """The best of the history written at `path` (a job's `history`)."""
        return cls.of(storage.read_json(path))

    def to_json(self) -> dict:
        return {"valid": self.valid, "score": self.score, "best_epoch": self.best_epoch, "epochs_run": self.epochs_run}


def read_shard(name: str, sort_by: str | None = None):
    """This Ray Train worker's whole shard of the dataset `name` as one pyarrow table (None when the
    shard is empty). With `sort_by`, in that column's order: Ray Data hands a shard's blocks over
    in whichever order its reads finish, and the trainers draw their batches by position."""
    import pyarrow as pa
    import ray.train

    parts = list(ray.train.get_dataset_shard(name).iter_batches(batch_size=None, batch_format="pyarrow"))
    if not parts:
        return None
    table = pa.concat_tables(parts)
    return table.sort_by(sort_by) if sort_by else table


def autocast(device: torch.device):
    """bf16 autocast on a GPU; none on a CPU (every CPU figure in the docs was measured in fp32)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def run(job: Job, worker: Worker) -> dict:
    """Train `job` on `worker` until its plan ends or validation stops improving; rank 0 saves each
    new best model and writes the history. Returns the loop's final state."""
    rank = worker.rank
    job.loss.to(worker.device)
    optim = job.optimizer(job.model)
    sched = job.schedule(optim)
    state = worker.restore(job.model, optim, sched, job.name)
    if state and rank == 0:
        say(f"[{job.stage}] {job.name}: resuming after epoch {state['epoch']} from the last checkpoint")
    model = worker.wrap(job.loss)
    plan = dataclasses.replace(job.plan, rank=rank)

    def on_validated(st: dict, improved: bool) -> None:
        if rank == 0 and improved:
            job.save()
        entry = st["history"][-1]
        worker.report(job.model, optim, sched, {**st, "part": job.name},
                      {"epoch": st["epoch"], "valid_score": entry["score"], "best_score": st["best"],
                       **job.metrics(entry["valid"])})

    def log(epoch: int, entry: dict, improved: bool) -> None:
        if rank == 0:
            words = ", ".join(w for w in (f"{entry['seconds']}s", job.detail) if w)
            say(f"[{job.stage}] {job.name} epoch {epoch + 1}/{plan.epochs}  loss={entry['loss'].get('total', 0):.4f}  "
                f"{job.describe(entry)}{'  *best' if improved else ''}  ({words})")

    state = loop.fit(model, optim, sched, plan, batches=job.batches, loss=model, validate=job.validate,
                     on_validated=on_validated, state=state, autocast=autocast(worker.device), log=log)
    if rank == 0:
        if state["bad_epochs"] >= plan.patience:
            say(f"[{job.stage}] {job.name}: early stop, no better validation score in {state['bad_epochs']} "
                f"validation(s)")
        storage.write_json(job.history, state["history"])
    return state


def torch_trainer(loop_fn: Callable[[dict], None], loop_config: dict, datasets: dict, section, *, name: str,
                  storage_path: str, callbacks: tuple = (), keep_checkpoints: int | None = 1,
                  dataset_config=None):
    """The `TorchTrainer` of one of the pipeline's Train runs. `section` is the stage's config
    section (its `num_workers`, `use_gpu`, `cpus_per_worker`, `max_failures`). Re-created with the
    same name and storage_path, it resumes from the run's last checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as TrainRunConfig
    from ray.train.torch import TorchTrainer

    extra = {"dataset_config": dataset_config} if dataset_config is not None else {}
    return TorchTrainer(
        loop_fn,
        train_loop_config=loop_config,
        datasets=datasets,
        scaling_config=ScalingConfig(num_workers=section.num_workers, use_gpu=section.use_gpu,
                                     resources_per_worker={"CPU": section.cpus_per_worker}),
        run_config=TrainRunConfig(name=name, storage_path=storage_path, callbacks=list(callbacks),
                                  failure_config=FailureConfig(max_failures=section.max_failures),
                                  checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints)),
        **extra,
    )


def fit(trainer) -> None:
    """Run a Train run to its end; a worker's error is raised here, in the driver."""
    result = trainer.fit()
    if result.error:
        raise result.error
