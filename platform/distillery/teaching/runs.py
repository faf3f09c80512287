"""The Ray Train runs of the teacher stage. The first trains the SASRec baseline grid, the teacher's
grid (one seed per width and dropout) and the text classifiers, one after another in one Train run
(a Train run costs ~10 s to start on a small machine); with `teacher.sequence.members` > 1 a second
trains the other seeds of each width at the dropout its grid chose. A model whose history is
written is kept, so a re-run goes on with the one it was training, from its last checkpoint."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .. import training
from ..config import RunConfig
from ..data.examples import read_split
from ..data.sources import read_parquet
from ..layout import PrepareDir, RunLayout, TeacherDir
from ..models.teacher import TeacherSpec, load_weights, set_threads
from ..progress import say
from . import sequence, text
from .grid import SequencePart, Trained, choose_dropouts, finished, grid_parts, sasrec_parts, seed_parts


@dataclass(frozen=True)
class TextPart:
    """A text classifier to train: its task, its folder and an epoch's batches per worker."""
    task: str
    out_dir: str
    steps: int

    @property
    def finished(self) -> bool:
        return finished(self.out_dir)


@dataclass
class TeacherRun:
    """What `teacher_loop` trains in one Train run, and what its workers share."""
    config: dict                 # the RunConfig, as JSON
    prepare_dir: str
    teacher_spec: TeacherSpec
    item_text: str               # the frozen encoder's item embeddings (`item_text.item_text_embeddings`)
    parts: list[SequencePart]
    text: list[TextPart]
    steps: int                   # an epoch's batches per worker of every sequence model
    popularity: list[float] | None  # the sampled softmax's proposal, when a part samples


@dataclass(frozen=True)
class TrainedGrids:
    """The trained sequence models: the teacher's grid and seeds, and the SASRec baselines."""
    teacher: list[Trained]
    sasrec: list[Trained]


def teacher_loop(config: dict) -> None:
    """Ray Train worker function: the sequence models of `config["run"]` (a `TeacherRun`), then its
    text classifiers, one after another, each skipped once its history is written. Every rank reads
    the same folders and goes through a model's epochs in step with the others (each epoch ends with
    a `ray.train.report` from every rank), so the ranks skip alike."""
    run: TeacherRun = config["run"]
    cfg = RunConfig.model_validate(run.config)
    set_threads(cfg.teacher.cpus_per_worker)
    worker = training.RayWorker()
    if run.parts:
        tasks = sequence.SequenceTasks.of(t for part in run.parts for t in part.tasks.names)
        longest = max(part.spec.max_history for part in run.parts)
        seqs, ctr = sequence.shards(tasks, longest + 1, sequence.click_history(cfg, tasks))
        item_text = load_weights(run.item_text)["item_text"] if any(p.spec.text_dim for p in run.parts) else None
        for part in run.parts:
            if not part.finished:
                training.run(sequence.job(cfg, part, run.teacher_spec, worker, prepare_dir=run.prepare_dir,
                                          item_text=item_text, proposal=run.popularity, steps=run.steps,
                                          seqs=seqs, ctr=ctr), worker)
    for part in run.text:
        if not part.finished:
            training.run(text.job(cfg, part.task, len(run.teacher_spec.classes[part.task]), part.out_dir, worker,
                                  prepare_dir=run.prepare_dir, steps=part.steps, df=text.shard(part.task)), worker)


def train_models(cfg: RunConfig, out_dir: str, text_dim: int, tspec: TeacherSpec) -> TrainedGrids:
    """Train the stage's models (`text_dim`: the item text embeddings' width, 0 without them);
    every model that finished before is kept."""
    out = TeacherDir(out_dir)
    tasks = sequence.SequenceTasks.of(cfg.tasks.enabled())
    sasrec, grid = sasrec_parts(cfg, out, tasks, tspec.n_items), grid_parts(cfg, out, tasks, tspec.n_items, text_dim)
    _train(cfg, out, tasks, tspec, sasrec + grid, text=True, name="teacher")
    teacher = [Trained.read(p) for p in grid]
    if cfg.teacher.sequence.members > 1 and grid:
        seeds = seed_parts(cfg, out, tasks, tspec.n_items, text_dim, choose_dropouts(teacher))
        _train(cfg, out, tasks, tspec, seeds, text=False, name="teacher-seeds")
        teacher += [Trained.read(p) for p in seeds]
    return TrainedGrids(teacher, [Trained.read(p) for p in sasrec])


def _finished(name: str, out_dir: str) -> bool:
    """`finished`, said when it is."""
    if finished(out_dir):
        say(f"[teacher] {name}: already trained, kept")
        return True
    return False


def _train(cfg: RunConfig, out: TeacherDir, tasks: sequence.SequenceTasks, tspec: TeacherSpec,
           parts: list[SequencePart], *, text: bool, name: str) -> None:
    """One Train run (`name`) of the `parts` not finished yet, and, with `text`, of the text
    classifiers not finished either."""
    import ray

    layout = RunLayout(cfg.run_dir)
    prepare_dir = layout.prepare.root
    todo = [part for part in parts if not _finished(part.name, part.out_dir)]
    datasets, steps, workers = {}, 1, cfg.teacher.num_workers
    if todo and tasks.next_item:
        users = sequence.user_sequences(read_split(prepare_dir, tasks.next_item, "train"))
        datasets[sequence.SEQUENCES] = ray.data.from_arrow(users).materialize()
        steps = max(1, math.ceil(users.num_rows / workers / cfg.teacher.sequence.batch_size))
    if todo and tasks.click:
        clicks = read_parquet(PrepareDir(prepare_dir).examples(tasks.click, "train")).materialize()
        datasets[sequence.IMPRESSIONS] = clicks
        if not tasks.next_item:
            steps = max(1, math.ceil(clicks.count() / workers / cfg.teacher.sequence.ctr_batch_size))
    text_parts = []
    for task in (tspec.classes if text else ()):
        if not _finished(task, out.classifier(task).root):
            datasets[task] = read_parquet(PrepareDir(prepare_dir).examples(task, "train")).materialize()
            text_parts.append(TextPart(task, out.classifier(task).root,
                                       max(1, math.ceil(datasets[task].count() / workers / cfg.teacher.intent_batch_size))))
    if not (todo or text_parts):
        return
    sampled = any(sequence.samples(cfg, part.spec) for part in todo)
    run = TeacherRun(cfg.model_dump(mode="json"), prepare_dir, tspec, out.item_text, todo, text_parts, steps,
                     sequence.popularity(prepare_dir, tspec.n_items) if sampled else None)
    training.fit(training.torch_trainer(teacher_loop, {"run": run}, datasets, cfg.teacher, name=name,
                                        storage_path=layout.teacher.ray_train))
