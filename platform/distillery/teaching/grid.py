"""The teacher's grids as typed records: the SASRec baselines (one per dim x dropout of
`teacher.sasrec`) and the sequence teacher's members (one per width x dropout of
`teacher.sequence`, then `members` - 1 more seeds at the dropout each width chose), and how the
members are chosen from the trained grid."""
from __future__ import annotations

from dataclasses import dataclass

from .. import storage
from ..training import Best
from ..config import RunConfig
from ..layout import PartDir, TeacherDir
from ..models.seqrec import SeqSpec
from .sequence import SequenceTasks, seq_spec


@dataclass(frozen=True)
class SequencePart:
    """One sequence model to train: its name (its folder's), its folder, its shape, the tasks it
    learns, whether it has a click head, its seed, and which seed of its grid point it is."""
    name: str
    out_dir: str
    spec: SeqSpec
    tasks: SequenceTasks
    ctr_head: bool
    seed: int
    seed_index: int = 0

    @property
    def finished(self) -> bool:
        return finished(self.out_dir)


def finished(out_dir: str) -> bool:
    """Whether the part trained into `out_dir` is done: its history is written last."""
    return storage.exists(PartDir(out_dir).history)


@dataclass(frozen=True)
class Trained:
    """A trained sequence model: its part and its best validation."""
    part: SequencePart
    best: Best

    @classmethod
    def read(cls, part: SequencePart) -> "Trained":
        return cls(part, Best.read(PartDir(part.out_dir).history))

    @property
    def name(self) -> str:
        return self.part.name

    @property
    def score(self) -> float:
        return self.best.score

    def to_json(self) -> dict:
        """Its row in the teacher's metrics.json (`teacher_grid`, `sasrec_grid`)."""
        return {"name": self.name, "spec": self.part.spec.to_json(), **self.best.to_json()}


def member_name(dim: int, dropout: float, seed_index: int, members: int) -> str:
    """A teacher member's part name (its folder under RUN_DIR/teacher/members/)."""
    return f"teacher-d{dim}-p{dropout:g}" + (f"-s{seed_index}" if members > 1 else "")


def sasrec_parts(cfg: RunConfig, out_dir: TeacherDir, tasks: SequenceTasks, n_items: int) -> list[SequencePart]:
    """The ID-only SASRec baselines, next item only; none without a next-item task or with
    `teacher.sasrec.enabled` off."""
    if not tasks.next_item or not cfg.teacher.sasrec.enabled:
        return []
    parts = []
    for dim in cfg.teacher.sasrec.dims:
        for p in cfg.teacher.sasrec.dropouts:
            name = f"sasrec-d{dim}-p{p:g}"
            parts.append(SequencePart(name, out_dir.sasrec(name).root,
                                      seq_spec(cfg, n_items, 0, dim=dim, dropout=p, item_text=False),
                                      SequenceTasks(next_item=tasks.next_item), ctr_head=False, seed=cfg.seed))
    return parts


def member_part(cfg: RunConfig, out_dir: TeacherDir, tasks: SequenceTasks, n_items: int, text_dim: int, dim: int,
                dropout: float, seed_index: int) -> SequencePart:
    """The teacher member of width `dim`, dropout `dropout` and seed index `seed_index`."""
    name = member_name(dim, dropout, seed_index, cfg.teacher.sequence.members)
    return SequencePart(name, out_dir.member(name).root, seq_spec(cfg, n_items, text_dim, dim=dim, dropout=dropout),
                        tasks, ctr_head=True, seed=cfg.seed + 1000 * seed_index, seed_index=seed_index)


def grid_parts(cfg: RunConfig, out_dir: TeacherDir, tasks: SequenceTasks, n_items: int,
               text_dim: int) -> list[SequencePart]:
    """The teacher's grid: seed index 0 of every width and dropout."""
    if not tasks:
        return []
    sc = cfg.teacher.sequence
    return [member_part(cfg, out_dir, tasks, n_items, text_dim, dim, p, 0) for dim in sc.dims for p in sc.dropouts]


def seed_parts(cfg: RunConfig, out_dir: TeacherDir, tasks: SequenceTasks, n_items: int, text_dim: int,
               dropouts: dict[int, float]) -> list[SequencePart]:
    """Seed indices 1 .. members-1 of each width at its chosen dropout."""
    return [member_part(cfg, out_dir, tasks, n_items, text_dim, dim, p, k) for dim, p in dropouts.items()
            for k in range(1, cfg.teacher.sequence.members)]


def choose_dropouts(grid: list[Trained]) -> dict[int, float]:
    """{width: the dropout whose first seed (seed index 0) has the best validation score}: the grid
    trains every (width, dropout) once; the other seeds train only at the chosen dropout."""
    best: dict[int, Trained] = {}
    for r in grid:
        dim = r.part.spec.dim
        if r.part.seed_index == 0 and (dim not in best or r.score > best[dim].score):
            best[dim] = r
    return {dim: r.part.spec.dropout for dim, r in best.items()}


def choose_members(grid: list[Trained]) -> list[Trained]:
    """The teacher's ensemble out of its trained grid: per width, every seed at the dropout
    `choose_dropouts` picks, in width then seed order."""
    dropouts = choose_dropouts(grid)
    chosen = [r for r in grid if dropouts.get(r.part.spec.dim) == r.part.spec.dropout]
    return sorted(chosen, key=lambda r: (list(dropouts).index(r.part.spec.dim), r.part.seed_index))
