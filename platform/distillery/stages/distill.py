"""The `distill` stage: one small multi-task student trained from the teacher's labels and the hard
labels, as a Ray Train job, and the no-distillation baseline (every alpha = 0, same budget) trained
the same way. Outputs RUN_DIR/distill/{student,student_no_kd}/{model/, history.json, metrics.json}.

Each task (`tasks/`) says which columns a training example needs, which rows each variant trains
on, and how the student turns a batch into the arguments of that task's loss module; the training
loop is one loop over whichever tasks are enabled.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn

from .. import evaluation, loop, storage, trainstate, training, warmstart
from ..config import RunConfig
from ..data.examples import vocab_size
from ..errors import StageError
from ..layout import DistillDir, RunLayout, StudentDir
from ..models import student as S
from ..models.student import StudentSpec
from ..models.teacher import TeacherSpec, set_threads, teacher_vectors
from ..progress import say
from ..tasks import SCORE_METRIC, TASKS, teacher_relative_score

VARIANTS = ("student", "student_no_kd")


# ------------------------------------------------------------------------------ batches
def _select(tensors: dict, idx: torch.Tensor, device) -> dict:
    """Rows `idx` of a task's tensors; a ragged bag (`bag_values` + `bag_offsets`, a text task's) is
    rebuilt as flat ids + offsets."""
    out = {k: v[idx].to(device) for k, v in tensors.items() if k not in ("bag_values", "bag_offsets")}
    if "bag_values" in tensors:
        starts, ends = tensors["bag_offsets"][idx], tensors["bag_offsets"][idx + 1]
        lengths = ends - starts
        flat = torch.repeat_interleave(starts - torch.cumsum(lengths, 0) + lengths, lengths) + torch.arange(int(lengths.sum()))
        out["bag_ids"] = tensors["bag_values"][flat].to(device)
        out["bag_offsets"] = (torch.cumsum(lengths, 0) - lengths).to(device)
    return out


def _count(tensors: dict | None) -> int:
    """Examples in one task's tensors (`Task.tensors`); 0 for None."""
    if not tensors:
        return 0
    return len(tensors["bag_offsets"]) - 1 if "bag_offsets" in tensors else len(next(iter(tensors.values())))


def mixed_batches(data: dict[str, dict | None], shares: dict[str, int], steps: int, device) -> Callable:
    """An epoch for `loop.fit`: batches(generator) yields `steps` batches, each {task: `shares[task]`
    examples drawn with replacement}. Tasks of very different sizes mix at fixed proportions rather
    than one epoch of each; a task without examples is left out."""
    sizes = {t: _count(v) for t, v in data.items()}

    def batches(gen: torch.Generator):
        for _ in range(steps):
            yield {t: _select(data[t], torch.randint(sizes[t], (shares[t],), generator=gen), device)
                   for t in data if sizes[t]}
    return batches


# ------------------------------------------------------------------------------ training
class DistillLoss(nn.Module):
    """The student plus one loss module per task: forward(batches) -> {task: loss, "total": sum w_t loss_t}.
    One module, so DDP synchronizes one forward."""

    def __init__(self, model: nn.Module, cfg: RunConfig, tasks: list[str], kd: bool,
                 loss_context: dict | None = None):
        """loss_context: {task: `Task.loss_context`} of the run's train tables (`Inputs.loss_context`)."""
        super().__init__()
        self.model, self.tasks = model, tasks
        self.weights = {t: TASKS[t].settings(cfg).weight for t in tasks}
        self.losses = nn.ModuleDict({t: TASKS[t].loss(cfg, kd, (loss_context or {}).get(t)) for t in tasks})

    def forward(self, batches: dict[str, dict]) -> dict[str, torch.Tensor]:
        items = self.model.item_vectors()
        out = {t: self.losses[t](*TASKS[t].forward(self.model, b, items)) for t, b in batches.items()}
        out["total"] = sum(self.weights[t] * v for t, v in out.items())
        return out


def _shares(cfg: RunConfig, tasks: list[str]) -> dict[str, int]:
    """Examples per task in each step's batch."""
    missing = [t for t in tasks if cfg.distill.mix.get(t, 0) <= 0]
    if missing:
        raise StageError(f"distill.mix gives no share to the enabled task(s) {', '.join(missing)}: "
                         f"set e.g. distill.mix.{missing[0]}=0.2, or disable it with tasks.{missing[0]}.enabled=false")
    total = sum(cfg.distill.mix[t] for t in tasks)
    return {t: max(1, round(cfg.distill.batch_size * cfg.distill.mix[t] / total)) for t in tasks}


def optimizer(student: torch.nn.Module, dc) -> torch.optim.AdamW:
    """AdamW in three groups: weight matrices and embedding tables with decay; biases, norms and the
    pooling query without; the text bag's table without decay and at `text_lr_scale` x the rate, as
    its rare rows see few updates (and decay would pull them back to zero between them)."""
    text = [p for n, p in student.named_parameters() if n.endswith("text.weight")]
    decay = [p for n, p in student.named_parameters() if p.ndim > 1 and not n.endswith("text.weight")]
    rest = [p for n, p in student.named_parameters() if p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": dc.weight_decay},
                              {"params": rest, "weight_decay": 0.0},
                              {"params": text, "weight_decay": 0.0, "lr": dc.lr * dc.text_lr_scale}], lr=dc.lr)


@dataclass(frozen=True)
class StudentRun:
    """One student a distillation Train run trains: `variant` (student or student_no_kd) into
    `out_dir`; `name` in progress lines and checkpoints; `init` a bundle whose weights it starts from."""
    variant: str
    out_dir: str
    name: str
    init: str | None = None


@dataclass
class StudentJobs:
    """What `train_loop` trains in one Train run (`runs`, one after another), and what its workers
    share: the run's config (JSON; a Tune trial's own), the student's spec, the batch plan, the
    teacher's validation metrics (students are scored relative to them) and each loss's context."""
    config: dict
    runs: list[StudentRun]
    prepare_dir: str
    tokenizer_dir: str               # the teacher's model folder: its tokenizer and item vectors
    spec: StudentSpec
    tasks: list[str]
    shares: dict[str, int]
    steps: int
    teacher_valid: dict
    loss_context: dict


def _initial_student(jobs: StudentJobs, cfg: RunConfig, run: StudentRun, announce: bool):
    """(student, tokenizer) a worker starts from: a warm start's weights, the teacher's projected
    vectors (the KD student) or random ones (the no-KD baseline). A restored checkpoint overrides it."""
    from transformers import AutoTokenizer

    with storage.local_copy(jobs.tokenizer_dir) as local:
        tokenizer = AutoTokenizer.from_pretrained(local)
    student = S.build_for_run(jobs.spec, jobs.prepare_dir, tokenizer)
    if run.init:
        student.load_state_dict(warmstart.initial_state(run.init))
        if announce:
            say(f"[distill] {run.name}: starting from the weights of {run.init}")
    elif run.variant == "student" and cfg.student.init_from_teacher:
        S.init_from_teacher(student, teacher_vectors(jobs.tokenizer_dir))
    return student, tokenizer


def _shard_tensors(tasks: list[str], variant: str, spec: StudentSpec) -> dict:
    """This worker's shard of each task's train rows (`Task.training_rows` of the variant) as tensors;
    None for a task whose shard is empty. The tables come from memory (`ray.data.from_arrow`), so
    a shard keeps their order."""
    data = {}
    for t in tasks:
        table = training.read_shard(t)
        table = TASKS[t].training_rows(table, kd=variant == "student") if table is not None else None
        data[t] = TASKS[t].tensors(table, spec) if table is not None and table.num_rows else None
    return data


def train_loop(config: dict) -> None:
    """Ray Train worker function: the students of `config["jobs"]` (a `StudentJobs`), one after
    another (the stage's two variants share one Train run, which costs ~10 s to start on a small
    machine). A run whose history is written is skipped, so a restarted Train run goes on with the
    student it was training, from that student's own last checkpoint."""
    jobs: StudentJobs = config["jobs"]
    cfg = RunConfig.model_validate(jobs.config)
    set_threads(cfg.distill.cpus_per_worker)
    worker = training.RayWorker()
    for run in jobs.runs:
        # every rank reads the same folders and reports each epoch, so the ranks skip alike
        if not storage.exists(StudentDir(run.out_dir).history):
            training.run(student_job(jobs, cfg, run, worker, _shard_tensors(jobs.tasks, run.variant, jobs.spec)),
                         worker)


def student_job(jobs: StudentJobs, cfg: RunConfig, run: StudentRun, worker: training.Worker,
                data: dict) -> training.Job:
    """The training job of one student on `worker` (`data`: its shard of each task's tensors); its
    best validation's model goes to `run.out_dir`."""
    dc, spec, tasks, device = cfg.distill, jobs.spec, jobs.tasks, worker.device
    torch.manual_seed(cfg.seed + worker.rank)
    student, tokenizer = _initial_student(jobs, cfg, run, announce=worker.rank == 0)

    def validate():
        valid = evaluation.evaluate(evaluation.student_predictors(student, tokenizer, spec, tasks, device),
                                    jobs.prepare_dir, "valid", n_items=spec.n_items, max_history=spec.history_window,
                                    seed=cfg.seed)
        return teacher_relative_score(valid, jobs.teacher_valid), valid

    def describe(entry: dict) -> str:
        v = entry["valid"]
        return "  ".join([*(f"{t}:{m}={v[t][m]:.4f}" for t, m in SCORE_METRIC.items() if t in v),
                          f"score={entry['score']:.4f} (of the teacher)"])

    return training.Job(
        name=run.name, stage="distill", model=student,
        loss=DistillLoss(student, cfg, tasks, kd=run.variant == "student", loss_context=jobs.loss_context),
        optimizer=lambda m: optimizer(m, dc),
        schedule=lambda optim: trainstate.warmup_linear(optim, jobs.steps * dc.epochs, dc.warmup_ratio),
        plan=loop.Plan(epochs=dc.epochs, patience=dc.patience, clip=1.0, clip_per_group=False, seed=cfg.seed),
        batches=mixed_batches(data, jobs.shares, jobs.steps, device), validate=validate,
        save=lambda: S.save(student, tokenizer, spec, StudentDir(run.out_dir).model),
        history=StudentDir(run.out_dir).history, describe=describe,
        metrics=lambda valid: {f"{t}_{m}": valid[t][m] for t, m in SCORE_METRIC.items() if t in valid},
        detail=f"{jobs.steps} steps")


# ------------------------------------------------------------------------------ the stage
def training_table(cfg: RunConfig, task: str, tokenizer, student: StudentSpec) -> pa.Table:
    """Train examples of `task` joined with their teacher labels by example id (every example must
    have exactly one: the label stage checked it, and a count mismatch here fails loudly)."""
    spec = TASKS[task]
    splits = list(spec.train_splits)
    layout = RunLayout(cfg.run_dir)
    ex_dir, lab_dir = layout.prepare.examples(task), layout.label.task(task)
    examples = _read_splits(ex_dir, splits, list(spec.example_columns), "prepare")
    labels = _read_splits(lab_dir, splits, ["example_id", *spec.label_columns], "label")
    # joined by position (Arrow's hash join does not carry list columns)
    pos = pc.index_in(examples.column("example_id"), value_set=labels.column("example_id"))
    matched = examples.num_rows - pos.null_count
    if matched != examples.num_rows or labels.num_rows != examples.num_rows:
        raise StageError(f"{task}/train: {examples.num_rows} examples in {ex_dir} but {labels.num_rows} labels in "
                         f"{lab_dir} ({matched} matched by example_id). Re-run the label stage with --force.")
    table = examples
    for col in spec.label_columns:
        table = table.append_column(col, labels.column(col).take(pos))
    return spec.training_table(table, tokenizer, student)


def _read_splits(folder: str, splits: list[str], columns: list[str], stage: str) -> pa.Table:
    """The split folders of `folder` that exist, as one table (`stage` wrote them)."""
    import pyarrow.parquet as pq

    tables = []
    for split in splits:
        path = storage.join(folder, split)
        if storage.exists(path):
            fs, local = storage.resolve(path)
            tables.append(pq.read_table(local, filesystem=fs, columns=columns))
    if not tables:
        raise StageError(f"{folder} has none of the split folders {', '.join(splits)}: re-run the {stage} stage "
                         f"with --force")
    return pa.concat_tables(tables, promote_options="permissive")


@dataclass
class Inputs:
    """What every distillation run of one RUN_DIR shares (the distill stage's two variants, the tune
    stage's trials): the train tables joined with their labels, the student's spec and the batch plan."""
    cfg: RunConfig
    tasks: list[str]
    spec: StudentSpec
    tables: dict[str, pa.Table]
    shares: dict[str, int]
    steps: int
    teacher_metrics: dict

    @property
    def loss_context(self) -> dict:
        """{task: what its loss needs from the whole train table (`Task.loss_context`)}."""
        return {t: TASKS[t].loss_context(tb, self.spec) for t, tb in self.tables.items()}

    @property
    def prepare_dir(self) -> str:
        return RunLayout(self.cfg.run_dir).prepare.root

    @property
    def teacher_dir(self) -> str:
        return RunLayout(self.cfg.run_dir).teacher.model


def student_spec(cfg: RunConfig, prepare_dir: str, tokenizer) -> StudentSpec:
    """The student this run distills: its config's shape, the teacher's classes and categories."""
    path = RunLayout(cfg.run_dir).teacher.spec
    teacher = TeacherSpec.from_json(storage.read_json(path), path)
    sc = cfg.student
    return StudentSpec(n_items=vocab_size(prepare_dir), n_categories=teacher.n_categories,
                       classes=teacher.classes, vocab_size=tokenizer.vocab_size, dim=sc.dim,
                       text_dim=sc.text_dim, ngram_buckets=sc.ngram_buckets, heads=sc.heads, layers=sc.layers,
                       dropout=sc.dropout, max_history=cfg.tasks.recommendation.max_history,
                       ctr_history=cfg.tasks.ctr.max_history, max_length=cfg.teacher.max_length,
                       tasks=tuple(cfg.tasks.enabled()))


def inputs(cfg: RunConfig) -> Inputs:
    from transformers import AutoTokenizer

    layout = RunLayout(cfg.run_dir)
    teacher_dir = layout.teacher.model
    for need, stage in ((layout.teacher.spec, "teacher"), (layout.teacher.metrics, "teacher"),
                        (layout.label.manifest, "label")):
        if not storage.exists(need):
            raise StageError(f"{need} is missing: run the {stage} stage first (--stages teacher,label,distill)")
    prepare_dir = layout.prepare.root
    teacher_metrics = storage.read_json(layout.teacher.metrics)
    tasks = [t for t in cfg.tasks.enabled() if t in teacher_metrics["valid"]]
    with storage.local_copy(teacher_dir) as local:
        tokenizer = AutoTokenizer.from_pretrained(local)
    spec = student_spec(cfg, prepare_dir, tokenizer)
    tables = {t: training_table(cfg, t, tokenizer, spec) for t in tasks}
    counts = {t: tb.num_rows for t, tb in tables.items()}
    steps = cfg.distill.steps_per_epoch or max(1, math.ceil(sum(counts.values()) / cfg.distill.batch_size
                                                             / cfg.distill.num_workers))
    return Inputs(cfg, tasks, spec, tables, _shares(cfg, tasks), steps, teacher_metrics)


def trainer(inp: Inputs, cfg: RunConfig, runs: list[StudentRun], datasets: dict, *, run_name: str, storage_path: str,
            spec: StudentSpec | None = None, callbacks: tuple = ()):
    """The TorchTrainer of one distillation Train run that trains `runs` in turn (`cfg` may differ
    from `inp.cfg` in loss and optimizer settings and the student's width, as a Tune trial's does).
    Re-created with the same run_name and storage_path, it resumes from its last checkpoint."""
    jobs = StudentJobs(cfg.model_dump(mode="json"), list(runs), inp.prepare_dir, inp.teacher_dir, spec or inp.spec,
                       inp.tasks, inp.shares, inp.steps, inp.teacher_metrics["valid"], inp.loss_context)
    return training.torch_trainer(train_loop, {"jobs": jobs}, datasets, cfg.distill, name=run_name,
                                  storage_path=storage_path, callbacks=callbacks)


def finish(inp: Inputs, out_dir: str, spec: StudentSpec | None = None) -> dict:
    """metrics.json of a trained run in `out_dir` (its best epoch's validation, test metrics)."""
    spec = spec or inp.spec
    model, tok, _ = S.load(StudentDir(out_dir).model)
    best = training.Best.read(StudentDir(out_dir).history)
    test = evaluation.evaluate(evaluation.student_predictors(model, tok, spec, inp.tasks), inp.prepare_dir, "test",
                               n_items=spec.n_items, max_history=spec.history_window, seed=inp.cfg.seed)
    metrics = {"valid": best.valid, "test": test, "valid_score": best.score, "best_epoch": best.best_epoch,
               "epochs_run": best.epochs_run, "params": sum(p.numel() for p in model.parameters())}
    storage.write_json(StudentDir(out_dir).metrics, metrics)
    return metrics


def run(cfg: RunConfig, out_dir: str) -> dict:
    import ray

    inp = inputs(cfg)
    src = warmstart.source(cfg)
    if src:
        warmstart.check_student(cfg, inp.spec)
    datasets = {t: ray.data.from_arrow(tb).materialize() for t, tb in inp.tables.items()}
    counts = {t: tb.num_rows for t, tb in inp.tables.items()}
    say(f"[distill] {counts} train examples; {inp.steps} steps per epoch of {inp.shares} examples per worker")
    summary, out, todo = {}, DistillDir(out_dir), []
    for variant in VARIANTS:
        vdir = out.variant(variant)
        if storage.exists(vdir.metrics):  # finished before an interruption
            summary[variant] = storage.read_json(vdir.metrics)
            say(f"[distill] {variant}: already trained, kept")
        else:  # the no-KD baseline always starts from scratch: it is the "without a teacher" reference
            todo.append(StudentRun(variant, vdir.root, variant, src.bundle if src and variant == "student" else None))
    if todo:
        training.fit(trainer(inp, cfg, todo, datasets, run_name="distill", storage_path=out.ray_train))
    for run in todo:
        summary[run.variant] = finish(inp, run.out_dir)
    storage.remove(out.ray_train)
    _print_table(inp.teacher_metrics, summary)
    result = {"counts": {"train_examples": counts}, "steps_per_epoch": inp.steps, "batch_shares": inp.shares,
           **{v: {"valid_score": s["valid_score"], "best_epoch": s["best_epoch"], "params": s["params"],
                  "test": s["test"]} for v, s in summary.items()}}
    if src:
        previous = warmstart.previous_metrics(cfg, inp.tasks)
        comparison = {"bundle": src.bundle, "previous_run": src.run_dir, "previous": previous,
                      "new": {"valid": summary["student"]["valid"], "test": summary["student"]["test"]}}
        storage.write_json(out.warm_start, comparison)
        print(f"[distill] warm start: the earlier student ({src.bundle}) and the new one on this window's test split:")
        print("\n".join(warmstart.comparison_table(previous["test"], summary["student"]["test"], SCORE_METRIC)))
        result["warm_start"] = {"bundle": src.bundle, "previous_test": previous["test"]}
    return result


def _print_table(teacher_metrics: dict, summary: dict) -> None:
    print("[distill] test metrics:")
    print(f"  {'task':<15} {'metric':<9} {'teacher':>8} {'student':>8} {'no-KD':>8}")
    for task, metric in SCORE_METRIC.items():
        if task in summary["student"]["test"]:
            print(f"  {task:<15} {metric:<9} {teacher_metrics['test'][task][metric]:>8.4f} "
                  f"{summary['student']['test'][task][metric]:>8.4f} {summary['student_no_kd']['test'][task][metric]:>8.4f}")
