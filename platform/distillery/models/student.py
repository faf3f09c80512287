"""The student: one small network for the three tasks, its typed shape (`StudentSpec`) and its
folder (`model.safetensors`, never pickle; `student.json`, the spec; the teacher's tokenizer files,
which the text bag indexes).

- text:   a bag (mean) of the teacher tokenizer's word pieces and of hashed word / character
          n-grams (`lexical.py`) in one table of width `text_dim`, projected to `dim`. No
          attention over the text: a request costs a few hundred lookups.
- items:  item-ID embedding + projected text bag of the item's text (title | brand | category,
          the teacher's) + category embedding. The item token bags are buffers saved with the
          weights, so a loaded student needs no catalogue file to score.
- users:  positions + `history_layers` small transformer layers (0: none, as both configs use)
          over the history's item vectors, then attention pooling with a learned query. The pooling weights say which history items
          weighed most (serving returns them as explanations).
- heads:  recommendation = user . item + item bias over the whole catalogue; CTR = MLP over
          (user, candidate, product, |difference|, candidate category, slot); one classifier MLP
          over the text vector per text classification task (`classifiers`, by task).

Compressed shapes (`shrink.py`) are the same class: MLP hidden widths other than `dim`, a text
table of only the kept rows (`text_rows`: the original ids kept, in order; every other id reads
one shared last row), and items whose text is folded into their ID rows (`item_text=False`: no
bags, item vector = ID row + category).
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from .. import storage
from ..data.examples import read_items
from ..lexical import text_features
from .spec import spec_from_json, spec_hash
from .teacher import MAX_SLOTS

PAD, UNKNOWN = 0, 1


@dataclass(frozen=True)
class StudentSpec:
    """The student's shape, saved beside its weights (`student.json`, the bundle's `config.json`
    "spec") and validated on load. The last four fields are the compressed shapes (`shrink.py`);
    a distilled student has their defaults."""

    n_items: int              # vocabulary size, the two reserved ids included
    n_categories: int
    classes: dict[str, tuple[str, ...]]  # each text classification task's class names, by class id
    vocab_size: int           # the teacher tokenizer's word pieces
    dim: int
    text_dim: int
    ngram_buckets: int
    heads: int
    layers: int
    dropout: float
    max_history: int          # recommendation history length
    ctr_history: int          # CTR history length
    max_length: int           # word pieces per text
    tasks: tuple[str, ...]
    ctr_hidden: int | None = None      # None: dim
    class_hidden: int | None = None    # the classifiers' hidden width; None: dim
    text_rows_kept: int | None = None  # None: the whole text table
    item_text: bool = True             # False: item text folded into the ID rows

    @property
    def history_window(self) -> int:
        """The longest history any of its tasks reads (its position table's length)."""
        return max(self.max_history, self.ctr_history)

    def __hash__(self) -> int:
        return spec_hash(self)

    def to_json(self) -> dict:
        return {**asdict(self), "classes": {t: list(v) for t, v in self.classes.items()}, "tasks": list(self.tasks)}

    @classmethod
    def from_json(cls, d: dict, source: str = "student spec") -> "StudentSpec":
        return spec_from_json(cls, d, source)


def text_bag(tokenizer, texts: list[str], *, max_length: int, buckets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts -> (ids [N], offsets [B]) for `Student.text_vectors`: the word pieces (at most
    `max_length`, no [CLS]/[SEP]) and, with `buckets` > 0, the n-gram ids shifted past the vocabulary."""
    texts = [t or "" for t in texts]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # the Rust tokenizer directly: ~15 us a text against ~45 us through the Python wrapper,
        # a third of a served text request's time. The wrapper re-sets these on each of its calls.
        if backend.truncation is not None:
            backend.no_truncation()
        if backend.padding is not None:
            backend.no_padding()
        encodings = ([backend.encode(texts[0], add_special_tokens=False)] if len(texts) == 1
                     else backend.encode_batch(texts, add_special_tokens=False))
        pieces = [e.ids[:max_length] for e in encodings]
    else:
        pieces = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
    ids: list[int] = []
    offsets: list[int] = []
    shift = tokenizer.vocab_size
    for text, p in zip(texts, pieces):
        offsets.append(len(ids))
        ids += p
        if buckets:
            ids += text_features(text, buckets, shift)
    return longs(ids), longs(offsets)


def longs(values) -> torch.Tensor:
    """A list of ints (or of equal-length int lists) -> an int64 tensor. Through numpy: ~3x faster
    than torch.tensor on a list, which a batch-1 request pays several times."""
    return torch.from_numpy(np.array(values, dtype=np.int64))


class Student(nn.Module):
    def __init__(self, *, vocab_size: int, n_items: int, n_categories: int, classes: dict[str, int],
                 item_category: torch.Tensor, item_bag_ids: torch.Tensor, item_bag_offsets: torch.Tensor,
                 dim: int = 64, text_dim: int = 32, ngram_buckets: int = 16384, max_history: int = 50,
                 heads: int = 2, history_layers: int = 1, dropout: float = 0.1, ctr_hidden: int | None = None,
                 class_hidden: int | None = None, text_rows: torch.Tensor | None = None, item_text: bool = True):
        """`classes`: {text classification task: its number of classes}, one classifier head each;
        `text_rows` [K] sorted ids of the kept text-table rows (None: all vocab_size + ngram_buckets);
        `item_text` False: items carry no text bags (their text was folded into their ID rows)."""
        super().__init__()
        self.vocab_size, self.ngram_buckets, self.max_history = vocab_size, ngram_buckets, max_history
        self.item_text = item_text
        rows = vocab_size + ngram_buckets if text_rows is None else len(text_rows) + 1
        self.text = nn.EmbeddingBag(rows, text_dim, mode="mean")
        nn.init.normal_(self.text.weight, std=0.1)
        if text_rows is None:
            self.text_rows = self.text_index = None
        else:
            self.register_buffer("text_rows", text_rows.long(), persistent=True)
            self.register_buffer("text_index", self._index(self.text_rows), persistent=False)
            # the index follows the kept ids whenever a state dict replaces them
            self.register_load_state_dict_post_hook(lambda m, _: setattr(m, "text_index", m._index(m.text_rows)))
        self.text_proj = nn.Linear(text_dim, dim)
        self.item = nn.Embedding(n_items, dim, padding_idx=PAD)
        nn.init.normal_(self.item.weight, std=0.02)
        self.category = nn.Embedding(max(n_categories, 1), dim)
        nn.init.normal_(self.category.weight, std=0.02)
        self.item_bias = nn.Embedding(n_items, 1)
        nn.init.zeros_(self.item_bias.weight)
        self.position = nn.Embedding(max_history + 1, dim)
        self.history = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout, batch_first=True, norm_first=True),
            history_layers, enable_nested_tensor=False) if history_layers else None
        self.pool_query = nn.Parameter(torch.randn(dim) * 0.02)
        self.slot = nn.Embedding(MAX_SLOTS + 1, 8)  # index 0 = unknown slot
        ctr_hidden, class_hidden = ctr_hidden or dim, class_hidden or dim
        self.ctr_mlp = nn.Sequential(nn.Linear(5 * dim + 8, ctr_hidden), nn.GELU(), nn.Dropout(dropout),
                                     nn.Linear(ctr_hidden, 1))
        self.classifiers = nn.ModuleDict({
            task: nn.Sequential(nn.Linear(dim, class_hidden), nn.GELU(), nn.Dropout(dropout),
                                nn.Linear(class_hidden, max(n, 1))) for task, n in classes.items()})
        self.register_buffer("item_category", item_category.long(), persistent=True)
        if item_text:
            self.register_buffer("item_bag_ids", item_bag_ids.long(), persistent=True)
            self.register_buffer("item_bag_offsets", item_bag_offsets.long(), persistent=True)

    def _index(self, kept: torch.Tensor) -> torch.Tensor:
        """[vocab_size + ngram_buckets] original id -> table row (kept ids in order, the rest the last row)."""
        index = torch.full((self.vocab_size + self.ngram_buckets,), len(kept), dtype=torch.long, device=kept.device)
        index[kept] = torch.arange(len(kept), device=kept.device)
        return index

    # ---- shared parts
    def text_vectors(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Flat bag ids [N] (original ids) and offsets [B] (`text_bag`) -> [B, dim]."""
        if self.text_index is not None:
            ids = self.text_index[ids]
        return self.text_proj(self.text(ids, offsets))

    def item_vectors(self) -> torch.Tensor:
        """[n_items, dim] for the whole catalogue: cheap enough to recompute every step."""
        out = self.item.weight + self.category(self.item_category)
        if self.item_text:
            out = out + self.text_vectors(self.item_bag_ids, self.item_bag_offsets)
        return out

    def user_vectors(self, history: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """history [B, H] item ids, right-aligned, 0 = padding; items [n_items, dim]
        -> (users [B, dim], pooling weights [B, H]; all zero for an empty history)."""
        pad = history == PAD
        # fewest ops at batch 1, where each costs ~5 us: the position rows are a slice of the
        # table (most recent item = row 0), the 1/sqrt(dim) scale is folded into the query
        h = items[history] + self.position.weight[:history.shape[1]].flip(0)
        if self.history is not None:
            # a row with no history would attend to nothing (NaN): let it see its first pad
            pad_mask = pad.clone()
            pad_mask[:, 0] &= ~pad.all(1)
            h = self.history(h, src_key_padding_mask=pad_mask)
        logits = h @ (self.pool_query / h.shape[-1] ** 0.5)
        weights = torch.softmax(logits.masked_fill(pad, float("-inf")), dim=1).nan_to_num(0.0)
        return (weights[..., None] * h).sum(1), weights

    # ---- heads
    def rec_scores(self, history: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """[B, H] -> [B, n_items]; padding and unknown ids score -inf."""
        items = self.item_vectors() if items is None else items
        users, _ = self.user_vectors(history, items)
        scores = users @ items.T + self.item_bias.weight.T
        scores[:, :2] = float("-inf")
        return scores

    def ctr_logits(self, history: torch.Tensor, item: torch.Tensor, slot: torch.Tensor,
                   items: torch.Tensor | None = None) -> torch.Tensor:
        """history [B, H], candidate item [B], slot [B] (-1 = unknown) -> [B] click logits."""
        items = self.item_vectors() if items is None else items
        users, _ = self.user_vectors(history, items)
        cand = items[item]
        x = torch.cat([users, cand, users * cand, (users - cand).abs(), self.category(self.item_category[item]),
                       self.slot((slot + 1).clamp(0, MAX_SLOTS))], dim=-1)
        return self.ctr_mlp(x).squeeze(-1)

    def class_logits(self, task: str, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Flat bag ids [N], offsets [B] -> [B, classes of `task`]."""
        return self.classifiers[task](self.text_vectors(ids, offsets))


def build(spec: StudentSpec, item_category: torch.Tensor | None = None, item_texts: list[str] | None = None,
          tokenizer=None) -> Student:
    """A fresh student; with `item_texts` (vocabulary order, from id 2) the item bags are built from
    them, otherwise they are placeholders that `load_state_dict` fills."""
    n = spec.n_items
    if item_texts is not None:
        ids, offsets = text_bag(tokenizer, ["", ""] + list(item_texts), max_length=spec.max_length,
                                buckets=spec.ngram_buckets)
    else:
        ids, offsets = torch.zeros(0, dtype=torch.long), torch.zeros(n, dtype=torch.long)
    kept = spec.text_rows_kept
    return Student(vocab_size=spec.vocab_size, n_items=n, n_categories=spec.n_categories,
                   classes={t: len(labels) for t, labels in spec.classes.items()},
                   item_category=item_category if item_category is not None else torch.zeros(n, dtype=torch.long),
                   item_bag_ids=ids, item_bag_offsets=offsets, dim=spec.dim, text_dim=spec.text_dim,
                   ngram_buckets=spec.ngram_buckets, heads=spec.heads,
                   max_history=spec.history_window, history_layers=spec.layers,
                   dropout=spec.dropout, ctr_hidden=spec.ctr_hidden, class_hidden=spec.class_hidden,
                   text_rows=None if kept is None else torch.arange(kept), item_text=spec.item_text)


def from_state(spec: StudentSpec, state: dict[str, torch.Tensor]) -> Student:
    """The student of `spec` holding `state` (float tensors): the catalogue-sized buffers take the
    state's sizes."""
    model = build(spec)
    for name, _ in list(model.named_buffers()):
        if name in state and "." not in name:
            setattr(model, name, torch.empty_like(state[name]))
    model.load_state_dict(state)
    return model


def build_for_run(spec: StudentSpec, prepare_dir: str, tokenizer) -> Student:
    items = read_items(prepare_dir)
    category = torch.tensor([0, 1] + items["category_idx"].tolist(), dtype=torch.long)
    return build(spec, category, items["text"].tolist(), tokenizer)


def _project(x: torch.Tensor, width: int) -> torch.Tensor:
    """Rows of x [N, H] in `width` dimensions by a truncated SVD (x ~ U S V^T -> U S, uncentered, so
    dot products between rows are kept as well as `width` dimensions can); zero-padded when H < width."""
    if x.shape[1] <= width:
        return torch.nn.functional.pad(x, (0, width - x.shape[1]))
    u, sv, _ = torch.linalg.svd(x.double(), full_matrices=False)
    k = min(width, len(sv))
    return torch.nn.functional.pad((u[:, :k] * sv[:k]).float(), (0, width - k))


@torch.no_grad()
def init_from_teacher(model: Student, vectors: dict[str, torch.Tensor]) -> None:
    """Start the student's item table from the teacher's item vectors and the word-piece rows of its
    text table from the teacher's word-piece embeddings, each projected to the student's width.
    The text rows are rescaled to the table's initial spread (the n-gram rows keep their random
    start); the item rows keep the teacher's scale, which its dot products were trained at."""
    if "items" in vectors and vectors["items"].shape[0] == model.item.weight.shape[0]:
        model.item.weight.copy_(_project(vectors["items"], model.item.weight.shape[1]))
    if "word_pieces" in vectors:
        words = _project(vectors["word_pieces"], model.text.weight.shape[1])
        n = min(len(words), model.vocab_size)
        rows = model.text.weight[:n]
        rows.copy_(words[:n] * (model.text.weight[model.vocab_size:].std() / words[:n].std().clamp(min=1e-12)
                                if model.ngram_buckets else 0.1 / words[:n].std().clamp(min=1e-12)))


def save(model: Student, tokenizer, spec: StudentSpec, out: str) -> None:
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
                  os.path.join(tmp, "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "student.json"), "w") as f:
            json.dump(spec.to_json(), f)
        storage.upload_dir(tmp, out)


def load(path: str) -> tuple[Student, object, StudentSpec]:
    """(student in eval mode, tokenizer, spec). The item bags' sizes come from the weights file."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    with storage.local_copy(path) as local:
        spec = StudentSpec.from_json(json.load(open(os.path.join(local, "student.json"))),
                                     f"{path}/student.json")
        state = load_file(os.path.join(local, "model.safetensors"))
        tokenizer = AutoTokenizer.from_pretrained(local)
    return from_state(spec, state).eval(), tokenizer, spec


def text_scorer(model: Student, tokenizer, spec: StudentSpec, device="cpu"):
    """-> f(task, texts) = the student's [B, C] logits for those texts (`evaluation.predictors`)."""
    def text_logits(task: str, texts: list[str]) -> torch.Tensor:
        ids, offsets = text_bag(tokenizer, texts, max_length=spec.max_length, buckets=spec.ngram_buckets)
        return model.class_logits(task, ids.to(device), offsets.to(device))
    return text_logits
