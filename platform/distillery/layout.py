"""The run directory, written down once.

Every stage reads and writes its files through these objects; no module builds another stage's
paths from strings. Paths are strings because a run directory may be a URI (`s3://...`,
`gs://...`) as well as a local folder (`storage.join` handles both).

    RUN_DIR/
      config.json                       the validated config of the last `distillery run`
      data/synthetic-<hash>/            generated input tables (data.synthetic)
      prepare/  manifest.json  items.parquet  interactions/  [reviews/]  rejects/
                vocab/{categories,users,intent_labels}.json
                examples/<task>/<split>/        train | valid | test | transfer (intent)
      teacher/  manifest.json  metrics.json  item_text.safetensors
                model/                          the teacher labels are made with (teacher.json, weights, tokenizer)
                members/teacher-d<dim>-p<dropout>[-s<seed>]/  sasrec/sasrec-d<dim>-p<dropout>/  intent/
                                                each: model.safetensors history.json
                ray_train/                      checkpoints, removed when the stage completes
      label/    manifest.json  <task>/<split>/*.parquet  _timings/  ray_train/
      distill/  manifest.json  warm_start.json
                student/  student_no_kd/        each a StudentDir: model/ metrics.json history.json
      tune/     manifest.json  best.json  trials.csv  tune.png
                best/  trials/<trial_id>/       StudentDirs;  ray_tune/  ray_train/
      compress/ manifest.json  metrics.json  variants.json
      bundle/                                   the servable student (bundle.py)
      report/                                   report.json, report.md, plots
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from . import storage
from .config import stable_hash
from .errors import StageError


def _join(root: str, *parts: str) -> str:
    return storage.join(root, *parts)


@dataclass(frozen=True)
class StudentDir:
    """A trained student: its weights folder, its metrics and its per-epoch history."""

    root: str

    @property
    def model(self) -> str:
        return _join(self.root, "model")

    @property
    def metrics(self) -> str:
        return _join(self.root, "metrics.json")

    @property
    def history(self) -> str:
        return _join(self.root, "history.json")


@dataclass(frozen=True)
class PartDir:
    """One trained part of the teacher (a sequence member, a SASRec baseline, the intent encoder)."""

    root: str

    @property
    def weights(self) -> str:
        return _join(self.root, "model.safetensors")

    @property
    def history(self) -> str:
        return _join(self.root, "history.json")


@dataclass(frozen=True)
class PrepareDir:
    root: str

    @property
    def manifest(self) -> str:
        return _join(self.root, "manifest.json")

    @property
    def items(self) -> str:
        return _join(self.root, "items.parquet")

    @property
    def rejects(self) -> str:
        return _join(self.root, "rejects")

    def table(self, name: str) -> str:
        """A validated input table's folder (interactions, reviews)."""
        return _join(self.root, name)

    def vocab(self, name: str) -> str:
        """categories | users | intent_labels -> its JSON file."""
        return _join(self.root, "vocab", f"{name}.json")

    def examples(self, task: str | None = None, split: str | None = None) -> str:
        return _join(self.root, "examples", *(p for p in (task, split) if p))


@dataclass(frozen=True)
class TeacherDir:
    root: str

    @property
    def model(self) -> str:
        return _join(self.root, "model")

    @property
    def spec(self) -> str:
        return _join(self.root, "model", "teacher.json")

    @property
    def metrics(self) -> str:
        return _join(self.root, "metrics.json")

    @property
    def item_text(self) -> str:
        return _join(self.root, "item_text.safetensors")

    @property
    def ray_train(self) -> str:
        return _join(self.root, "ray_train")

    def member(self, name: str) -> PartDir:
        """A sequence model of the teacher's grid (`teaching.grid.member_name`)."""
        return PartDir(_join(self.root, "members", name))

    def sasrec(self, name: str) -> PartDir:
        return PartDir(_join(self.root, "sasrec", name))

    def classifier(self, task: str) -> PartDir:
        """The fine-tuned text classifier of a text classification task."""
        return PartDir(_join(self.root, task))

    def trained(self, kind: str) -> dict[str, PartDir]:
        """kind "members" or "sasrec" -> {name: part} of every such part with a history, by name."""
        root = _join(self.root, kind)
        if not storage.exists(root):
            return {}
        names = sorted({storage.parent(f).rsplit("/", 1)[-1] for f in storage.list_files(root, (".json",))
                        if f.endswith("history.json")})
        return {n: PartDir(_join(root, n)) for n in names}


@dataclass(frozen=True)
class LabelDir:
    root: str

    @property
    def manifest(self) -> str:
        return _join(self.root, "manifest.json")

    def task(self, task: str, split: str | None = None) -> str:
        return _join(self.root, task, *([split] if split else []))

    @property
    def timings(self) -> str:
        return _join(self.root, "_timings")

    @property
    def ray_train(self) -> str:
        return _join(self.root, "ray_train")


@dataclass(frozen=True)
class DistillDir:
    root: str

    def variant(self, name: str) -> StudentDir:
        """student | student_no_kd"""
        return StudentDir(_join(self.root, name))

    @property
    def warm_start(self) -> str:
        return _join(self.root, "warm_start.json")

    @property
    def ray_train(self) -> str:
        return _join(self.root, "ray_train")


@dataclass(frozen=True)
class TuneDir:
    root: str

    @property
    def summary(self) -> str:
        """best.json: the winner, its parameters and whether it beat the distill stage's student."""
        return _join(self.root, "best.json")

    @property
    def best(self) -> StudentDir:
        return StudentDir(_join(self.root, "best"))

    def trial(self, trial_id: str) -> StudentDir:
        return StudentDir(_join(self.root, "trials", trial_id))

    @property
    def trials_csv(self) -> str:
        return _join(self.root, "trials.csv")

    @property
    def plot(self) -> str:
        return _join(self.root, "tune.png")

    @property
    def ray_tune(self) -> str:
        return _join(self.root, "ray_tune")

    @property
    def ray_train(self) -> str:
        return _join(self.root, "ray_train")


@dataclass(frozen=True)
class CompressDir:
    root: str

    @property
    def metrics(self) -> str:
        return _join(self.root, "metrics.json")

    @property
    def variants(self) -> str:
        return _join(self.root, "variants.json")


class Winner(NamedTuple):
    """The student that compress takes, and where it came from (best.json's record, not its path)."""

    folder: str
    source: str                 # "distill" or "tune"
    params: dict | None = None  # the winning trial's sampled values (source "tune")
    trial_id: str | None = None


@dataclass(frozen=True)
class RunLayout:
    run_dir: str

    @property
    def config(self) -> str:
        return _join(self.run_dir, "config.json")

    def stage(self, name: str) -> str:
        """A stage's output folder (what the runner passes it as `out_dir`)."""
        return _join(self.run_dir, name)

    def manifest(self, stage: str) -> str:
        return _join(self.run_dir, stage, "manifest.json")

    def current(self, stage: str) -> bool:
        """Whether `stage` finished from the outputs now in the run directory: every upstream manifest
        it recorded is there, unchanged and itself current. A re-run distill leaves an earlier sweep's
        and compression's outputs in place; they are not this run's and must not be read as such."""
        manifests, verdicts = {}, {}  # each manifest read and each stage judged once, however many refer to it

        def manifest(name: str) -> dict | None:
            if name not in manifests:
                path = self.manifest(name)
                manifests[name] = storage.read_json(path) if storage.exists(path) else None
            return manifests[name]

        def ok(name: str) -> bool:
            if name not in verdicts:
                m = manifest(name)
                verdicts[name] = bool(m) and m.get("status") == "complete" and all(
                    manifest(u) is not None and stable_hash(manifest(u)) == h and ok(u)
                    for u, h in m.get("upstream", {}).items())
            return verdicts[name]
        return ok(stage)

    def synthetic_data(self, key: str) -> str:
        return _join(self.run_dir, "data", f"synthetic-{key}")

    @property
    def prepare(self) -> PrepareDir:
        return PrepareDir(self.stage("prepare"))

    @property
    def teacher(self) -> TeacherDir:
        return TeacherDir(self.stage("teacher"))

    @property
    def label(self) -> LabelDir:
        return LabelDir(self.stage("label"))

    @property
    def distill(self) -> DistillDir:
        return DistillDir(self.stage("distill"))

    @property
    def tune(self) -> TuneDir:
        return TuneDir(self.stage("tune"))

    @property
    def compress(self) -> CompressDir:
        return CompressDir(self.stage("compress"))

    @property
    def bundle(self) -> str:
        return self.stage("bundle")

    @property
    def report(self) -> str:
        return self.stage("report")

    def winner(self) -> Winner:
        """The sweep's best student when the tune stage ran on this run's distill stage (`current`) and
        its best beat the distill stage's student on validation (best.json `winner`), else the distill
        stage's student."""
        summary = storage.read_json(self.tune.summary) if self.current("tune") else {}
        tuned = self.tune.best.model
        if summary.get("winner") == "tune" and storage.exists(storage.join(tuned, "model.safetensors")):
            return Winner(tuned, "tune", summary["params"], summary["trial_id"])
        folder = self.distill.variant("student").model
        if storage.exists(storage.join(folder, "model.safetensors")):
            return Winner(folder, "distill")
        raise StageError(f"no student in {self.run_dir}: run the distill stage first")
