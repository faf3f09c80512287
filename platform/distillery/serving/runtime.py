"""The student at serving time: a trained `Student` with every item-side and text-side product
computed once at load, so that a request runs a dozen small tensor ops.

At batch 1 on a CPU each op costs a fixed 5-25 us of dispatch whatever its size, so the op count,
not the arithmetic, sets a small model's latency. What is folded, exactly (tests compare against
`Student`'s own heads):
- recommendation: item vectors and biases as one [dim, n_items] matrix and a bias row whose
  padding/unknown entries are -inf, so scoring is one addmm;
- CTR: the first MLP layer is linear in cat(user, item, user*item, |user-item|, category, slot);
  its item, category, slot and bias terms become per-item and per-slot tables;
- text classes: EmbeddingBag(mean) -> Linear -> Linear is linear up to the GELU: the two matrices
  are one, per text classification task.

The history encoder's optional transformer layers (`history_layers` > 0) are run as they are.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.student import PAD, Student, StudentSpec, longs, text_bag
from ..models.teacher import MAX_SLOTS


def pad(histories, length: int, *, to_longest: bool = False) -> torch.Tensor:
    """Ragged id lists -> [B, length] LongTensor, most recent `length` kept, left-padded with 0 (one
    op). With `to_longest`, padded only to the batch's longest history (at least 1): the student's
    positions count from the most recent item, so its scores do not depend on the padding."""
    if to_longest and len(histories) == 1:  # a single request: no padding at all
        return longs([list(histories[0])[-length:] or [PAD]])
    rows = [list(h)[-length:] for h in histories]
    if to_longest:
        length = max([len(r) for r in rows] + [1])
    return longs([[PAD] * (length - len(r)) + r for r in rows]).reshape(len(rows), length)


class StudentRuntime:
    """Inference for every task from a trained `Student`."""

    @torch.inference_mode()
    def __init__(self, model: Student, tokenizer, spec: StudentSpec):
        model.eval()
        self.model, self.tokenizer, self.spec = model, tokenizer, spec
        self.rec_history, self.ctr_history = spec.max_history, spec.ctr_history
        d = model.item.embedding_dim
        items = model.item_vectors()
        self.items = items.contiguous()
        self.items_t = items.T.contiguous()
        bias = model.item_bias.weight[:, 0].clone()
        bias[:PAD + 2] = float("-inf")  # padding and unknown ids are never recommended
        self.rec_bias = bias
        self.positions = model.position.weight.flip(0).contiguous()  # row -1 = the most recent item
        self.query = model.pool_query / d ** 0.5

        first, second = _linear(model.ctr_mlp[0]), _linear(model.ctr_mlp[3])
        w, b = first
        self.ctr_user = torch.cat([w[:, :d], w[:, 2 * d:3 * d], w[:, 3 * d:4 * d]], 1).T.contiguous()  # [3d, d]
        # one gather per candidate: [item vector | its first-layer term]
        self.ctr_item = torch.cat([items, items @ w[:, d:2 * d].T
                                   + model.category.weight[model.item_category] @ w[:, 4 * d:5 * d].T + b], 1)
        # row s = slot s (0..MAX_SLOTS-1, larger ones clamped as in training); row -1 = unknown (slot -1)
        slots = model.slot.weight @ w[:, 5 * d:].T
        self.ctr_slot = torch.cat([slots[1:], slots[-1:], slots[:1]]).contiguous()
        self.ctr_out = second

        proj = _linear(model.text_proj)
        # The bag stays text_dim wide: a request gathers ~50 random rows, and on a CPU cache misses
        # on a wider table cost more than the one small matmul that folding it would save.
        self.text_table = model.text.weight.detach()
        self.text_index = model.text_index  # original id -> kept row of a vocabulary-pruned table, or None
        self.classifiers = {}  # task -> (first layer folded with the text projection, output layer)
        for task, mlp in model.classifiers.items():
            hidden = _linear(mlp[0])
            self.classifiers[task] = ((hidden[0] @ proj[0], hidden[0] @ proj[1] + hidden[1]), _linear(mlp[3]))

    # ---- inputs
    def histories(self, histories, length: int) -> torch.Tensor:
        """Ragged item-id lists -> the [B, H] input of `rec_scores` (length `rec_history`) or
        `ctr_logits` (`ctr_history`): the most recent `length` items, padded only as far as the
        batch needs."""
        return pad(histories, length, to_longest=True)

    def text_inputs(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts -> (rows of `text_table` [N], offsets [B])."""
        ids, offsets = text_bag(self.tokenizer, texts, max_length=self.spec.max_length,
                                buckets=self.spec.ngram_buckets)
        return (ids if self.text_index is None else self.text_index[ids]), offsets

    # ---- tasks
    @torch.inference_mode()
    def users(self, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """history [B, H] (right-aligned, 0 = padding) -> (users [B, dim], pooling weights [B, H])."""
        x = self.items[history] + self.positions[-history.shape[1]:]
        if self.model.history is not None:
            pad_mask = history == PAD
            pad_mask[:, 0] &= ~pad_mask.all(1)
            x = self.model.history(x, src_key_padding_mask=pad_mask)
        logits = x @ self.query
        if history.shape[0] == 1 and history[0, 0].item() != PAD:  # one unpadded history: no mask
            weights = torch.softmax(logits, 1)
        else:  # an all-padding row is NaN after the softmax: no history, zero weights
            weights = torch.softmax(logits.masked_fill(history == PAD, float("-inf")), 1).nan_to_num_(0.0)
        return (weights.unsqueeze(1) @ x).squeeze(1), weights

    @torch.inference_mode()
    def rec_scores(self, history: torch.Tensor) -> torch.Tensor:
        """[B, H] -> [B, n_items]; padding and unknown ids score -inf."""
        return self.rec_from_users(self.users(history)[0])

    @torch.inference_mode()
    def rec_from_users(self, u: torch.Tensor) -> torch.Tensor:
        """users [B, dim] -> [B, n_items] scores (padding and unknown ids -inf)."""
        return torch.addmm(self.rec_bias, u, self.items_t)

    @torch.inference_mode()
    def ctr_logits(self, history: torch.Tensor, item: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """history [B, H], candidate [B], slot [B] (-1 = unknown) -> [B] click logits."""
        return self.ctr_from_users(self.users(history)[0], item, slot)

    @torch.inference_mode()
    def ctr_from_users(self, u: torch.Tensor, item: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """users [N, dim], candidate [N], slot [N] -> [N] click logits. A served request scores many
        candidates for one history: its user vector is computed once and repeated."""
        c, item_term = self.ctr_item[item].split(u.shape[1], 1)
        z = torch.addmm(item_term + self.ctr_slot[slot.clamp(-1, MAX_SLOTS)],
                        torch.cat([u, u * c, (u - c).abs_()], 1), self.ctr_user)
        return F.linear(F.gelu(z), *self.ctr_out).squeeze(-1)

    def text_logits(self, task: str, texts: list[str]) -> torch.Tensor:
        """Texts -> [B, classes of `task`] logits."""
        return self.class_logits(task, *self.text_inputs(texts))

    @torch.inference_mode()
    def class_logits(self, task: str, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Flat bag ids [N], offsets [B] (`text_inputs`) -> [B, classes of `task`]."""
        if offsets.shape[0] == 1 and ids.shape[0]:  # one text: a gather is cheaper than embedding_bag
            bag = self.text_table[ids].mean(0, keepdim=True)
        else:
            bag = F.embedding_bag(ids, self.text_table, offsets, mode="mean")
        hidden, out = self.classifiers[task]
        return F.linear(F.gelu(F.linear(bag, *hidden)), *out)


def _linear(layer: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    return layer.weight.detach(), layer.bias.detach()
