"""Incremental re-distillation: a run that continues from an earlier run's bundle.

    distillery run CONFIG --warm-start BUNDLE data.interactions=NEW_WINDOW run_dir=NEW_RUN

sets `warm_start=BUNDLE`. The bundle's config names the run that built it (its `run_dir`), and
that run's teacher and labels are reused:

- prepare   builds the new window's examples as usual, but keeps the earlier run's text classes
            (the teacher's classifiers have those outputs) and refuses a catalogue that differs from
            the earlier run's (item ids, categories and texts: the teacher's item vectors and the
            student's item table are indexed by it).
- teacher   copies the earlier run's fine-tuned teacher instead of training one, and evaluates it
            on the new window (`stages.teacher.reuse`, with what this module says of the source).
- label     copies the earlier labels of every example whose fingerprint (`label.fingerprints`)
            the earlier teacher labelled with the same settings; the teacher labels the rest.
- distill   starts the student from the uncompressed student the bundle was made from (the
            bundle's `student_dir`; bundles without one: its own weights, 8-bit ones dequantized),
            and compares the earlier student with the new one on the new window. The no-KD
            baseline still starts from scratch: it is the "what without a teacher" reference, not
            a second model.
- tune      is not run: its trials train students of other shapes from scratch.
"""
from __future__ import annotations

import copy
import functools
import math
from typing import NamedTuple

import torch

from . import storage
from .config import RunConfig, stable_hash
from .errors import DataError, StageError
from .layout import RunLayout
from .models.student import StudentSpec
from .serving import bundle

# the student's shape: a bundle's weights fit a new student only where all of these are equal
SHAPE_KEYS = ("n_items", "n_categories", "classes", "vocab_size", "dim", "text_dim",
              "ngram_buckets", "heads", "layers", "max_history", "ctr_history", "max_length", "tasks")


class Source(NamedTuple):
    bundle: str
    config: dict  # the bundle's config.json
    run_dir: str  # the run that wrote the bundle

    @property
    def spec(self) -> StudentSpec:
        """The bundle's student (compressed shapes included)."""
        return StudentSpec.from_json(self.config["spec"], f"{self.bundle}/config.json: spec")

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.run_dir)

    @property
    def teacher_dir(self) -> str:
        return self.layout.teacher.model

    @property
    def label_dir(self) -> str:
        return self.layout.label.root

    @property
    def items(self) -> str:
        return self.layout.prepare.items

    @property
    def student_dir(self) -> str | None:
        """The uncompressed student the bundle came from (pruned shapes do not train further)."""
        return self.config.get("student_dir")


@functools.lru_cache(maxsize=8)
def _verified_config(path: str, identity: str) -> dict:
    """The config.json of the bundle at `path`, after `bundle.verify`. Every stage of a run asks for
    the warm-start source; `identity` (a hash of the bundle's file names, sizes and mtimes) keys the
    cache, so its files are hashed once per process and again only when they change."""
    bundle.verify(path)
    return storage.read_json(storage.join(path, "config.json"))


def source(cfg: RunConfig) -> Source | None:
    """The earlier run of a warm-started config (None without `warm_start`), checked: the bundle
    verifies, its run is another one, and that run still has its teacher and catalogue."""
    if not cfg.warm_start:
        return None
    path = storage.absolute(cfg.warm_start)
    config = copy.deepcopy(_verified_config(path, stable_hash(storage.fingerprint(path))))
    run_dir = config.get("run_dir")
    if not run_dir:
        raise StageError(f"warm_start={cfg.warm_start}: the bundle does not say which run built it (no run_dir in "
                         "its config.json; bundles of distillery 0.1 and later do)")
    if storage.absolute(run_dir).rstrip("/") == storage.absolute(cfg.run_dir).rstrip("/"):
        raise StageError(f"warm_start={cfg.warm_start} was built in run_dir={cfg.run_dir} itself: give the new "
                         "window a new run_dir (the new run replaces stage outputs that the warm start reads)")
    if "spec" not in config:
        raise StageError(f"warm_start={cfg.warm_start}: its config.json has no student spec (a bundle of an older "
                         "distillery): re-export it from its run with this version, or run without --warm-start")
    src = Source(path, config, run_dir)
    needs = [storage.join(src.teacher_dir, "model.safetensors"), src.items]
    if src.student_dir:
        needs.append(storage.join(src.student_dir, "model.safetensors"))
    for need in needs:
        if not storage.exists(need):
            raise StageError(f"warm_start={cfg.warm_start}: {need} is missing. The bundle's run ({run_dir}) must keep "
                             "its teacher and prepare outputs; copy them back, or run without --warm-start")
    return src


def label_source(cfg: RunConfig) -> str | None:
    src = source(cfg)
    return src.label_dir if src else None


def classes(cfg: RunConfig, task: str) -> list[str] | None:
    """The classes of a text classification task that a warm-started run must keep (the bundle's:
    the teacher's classifier has those outputs), or None."""
    src = source(cfg)
    return list(src.spec.classes[task]) if src and task in src.spec.classes else None


def check_catalogue(cfg: RunConfig, items_path: str) -> None:
    """DataError unless the prepared catalogue at `items_path` is the earlier run's: same item ids in
    the same order, with the same categories and texts."""
    import pyarrow.parquet as pq

    src = source(cfg)
    if src is None:
        return
    cols = ["item_id", "category", "text"]

    def read(path):
        fs, p = storage.resolve(path)
        return pq.read_table(p, filesystem=fs, columns=cols).to_pandas()

    old, new = read(src.items), read(items_path)
    added = sorted(set(new["item_id"]) - set(old["item_id"]))
    gone = sorted(set(old["item_id"]) - set(new["item_id"]))
    if added or gone:
        raise DataError(
            f"warm start needs the catalogue of the run it continues ({src.run_dir}): {cfg.data.items or 'the data'} "
            f"adds {len(added)} items (e.g. {added[:3]}) and lacks {len(gone)} (e.g. {gone[:3]}). The student's item "
            "table cannot grow in place: run without --warm-start to distil a student for the new catalogue")
    changed = old["item_id"][(old[cols[1:]].fillna("").to_numpy() != new[cols[1:]].fillna("").to_numpy()).any(axis=1)]
    if len(changed):
        raise DataError(
            f"warm start needs the catalogue of the run it continues ({src.run_dir}): {len(changed)} items changed "
            f"their category or text (e.g. {changed.tolist()[:3]}), and the teacher's item vectors come from them. "
            "Run without --warm-start")


# ------------------------------------------------------------------------------ student
def check_student(cfg: RunConfig, spec: StudentSpec) -> None:
    """StageError naming each setting where the new student's shape differs from the bundle's."""
    src = source(cfg)
    if src.student_dir:
        path = storage.join(src.student_dir, "student.json")
        start = StudentSpec.from_json(storage.read_json(path), path)
    else:
        start = src.spec
    diff = {k: (getattr(start, k), getattr(spec, k)) for k in SHAPE_KEYS if getattr(start, k) != getattr(spec, k)}
    if diff:
        hint = {"dim": "student.dim", "text_dim": "student.text_dim", "ngram_buckets": "student.ngram_buckets",
                "heads": "student.heads", "layers": "student.layers", "max_history": "tasks.recommendation.max_history",
                "ctr_history": "tasks.ctr.max_history", "max_length": "teacher.max_length", "tasks": "tasks.*.enabled"}
        lines = [f"{hint.get(k, k)}: bundle {_short(a)}, this run {_short(b)}" for k, (a, b) in diff.items()]
        raise StageError(f"the student of warm_start={cfg.warm_start} has another shape than this run's:\n  "
                         + "\n  ".join(lines) + "\nset those keys to the bundle's values, or run without --warm-start")


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def initial_state(path: str) -> dict[str, torch.Tensor]:
    """The float weights a warm start begins from: the uncompressed student the bundle at `path`
    was made from, or the bundle's own (8-bit ones dequantized) when it names none."""
    from .models import student as S

    bundle.verify(path)
    config = storage.read_json(storage.join(path, "config.json"))
    if config.get("student_dir"):
        return S.load(config["student_dir"])[0].state_dict()
    return bundle.load(path).model.state_dict()


def previous_metrics(cfg: RunConfig, tasks: list[str]) -> dict:
    """The bundle's student on this run's window: {"valid": ..., "test": ...}."""
    from . import evaluation

    loaded = bundle.load(source(cfg).bundle)
    prepare_dir = RunLayout(cfg.run_dir).prepare.root
    out = {}
    for split in ("valid", "test"):
        out[split] = evaluation.evaluate(evaluation.student_predictors(loaded.model, loaded.tokenizer, loaded.spec, tasks), prepare_dir,
                                         split, n_items=loaded.spec.n_items, max_history=loaded.spec.history_window,
                                         seed=cfg.seed)
    return out


def comparison_table(previous: dict, new: dict, metrics: dict[str, str]) -> list[str]:
    """Lines of a previous-vs-new table of test metrics, one per task."""
    lines = [f"  {'task':<15} {'metric':<9} {'previous':>9} {'new':>9} {'change':>8}"]
    for task, metric in metrics.items():
        if task in new and task in previous:
            a, b = previous[task][metric], new[task][metric]
            change = (b - a) / a * 100 if a and not math.isnan(a) else float("nan")
            lines.append(f"  {task:<15} {metric:<9} {a:>9.4f} {b:>9.4f} {change:>+7.1f}%")
    return lines
