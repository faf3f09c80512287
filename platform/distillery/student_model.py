"""The student: one small network for the three tasks, sharing its item and text embeddings.

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
          (user, candidate, product, |difference|, candidate category, slot); intent = MLP over
          the text vector.

Compressed shapes (`shrink.py`) are the same class: MLP hidden widths other than `dim`, a text
table of only the kept rows (`text_rows`: the original ids kept, in order; every other id reads
one shared last row), and items whose text is folded into their ID rows (`item_text=False`: no
bags, item vector = ID row + category).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .lexical import text_features
from .teacher_model import MAX_SLOTS

PAD, UNKNOWN = 0, 1


def text_bag(tokenizer, texts: list[str], *, max_length: int, buckets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts -> (ids [N], offsets [B]) for `Student.text_vectors`: the word pieces (at most
    `max_length`, no [CLS]/[SEP]) and, with `buckets` > 0, the n-gram ids shifted past the vocabulary."""
    texts = [t or "" for t in texts]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # the Rust tokenizer directly: ~15 us a text against ~45 us through the Python wrapper,
        # a third of a served intent request's time. The wrapper re-sets these on each of its calls.
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
    def __init__(self, *, vocab_size: int, n_items: int, n_categories: int, n_intents: int,
                 item_category: torch.Tensor, item_bag_ids: torch.Tensor, item_bag_offsets: torch.Tensor,
                 dim: int = 64, text_dim: int = 32, ngram_buckets: int = 16384, max_history: int = 50,
                 heads: int = 2, history_layers: int = 1, dropout: float = 0.1, ctr_hidden: int | None = None,
                 intent_hidden: int | None = None, text_rows: torch.Tensor | None = None, item_text: bool = True):
        """`text_rows` [K] sorted ids of the kept text-table rows (None: all vocab_size + ngram_buckets);
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
        ctr_hidden, intent_hidden = ctr_hidden or dim, intent_hidden or dim
        self.ctr_mlp = nn.Sequential(nn.Linear(5 * dim + 8, ctr_hidden), nn.GELU(), nn.Dropout(dropout),
                                     nn.Linear(ctr_hidden, 1))
        self.intent_mlp = nn.Sequential(nn.Linear(dim, intent_hidden), nn.GELU(), nn.Dropout(dropout),
                                        nn.Linear(intent_hidden, max(n_intents, 1)))
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

    def intent_logits(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Flat bag ids [N], offsets [B] -> [B, n_intents]."""
        return self.intent_mlp(self.text_vectors(ids, offsets))
