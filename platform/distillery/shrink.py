"""Structural compression of a trained student: each step returns a new dense `Student` of a smaller
shape and its spec. Nothing is kept as a mask: what a step removes is gone from the file and from
the arithmetic.

- `fold_item_text`: the text part of every item vector (bag -> text table -> projection) added into
  the item's ID row once; the item bags, int64 token ids of every catalogue text and most of a
  small student's file, are dropped. Exact.
- `prune_vocabulary`: keep the text-table rows that the catalogue and the training texts use at
  least `min_count` times, plus `reserve` more word pieces (lowest ids first: WordPiece and BPE
  vocabularies list frequent pieces first); every other id reads one shared row, the mean of the
  dropped ones. Exact on every text whose ids are all kept.
- `prune_units`: keep a fraction of the hidden units of the CTR MLP and of each text classifier and
  of the text table's columns, ranked by the magnitude of what goes in and what comes out of each unit
  (||in|| * ||out||); exact where the removed units' outgoing weights are zero. The caller
  fine-tunes the result.

The shared width `dim` is not pruned: the item, position, category and user vectors and both
heads' inputs hang on it, and the recommendation scores are dot products in it.
"""
from __future__ import annotations

import dataclasses

import torch

from .models import student as S
from .models.student import Student, StudentSpec


def _state(model: Student) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def fold_item_text(model: Student, spec: StudentSpec) -> tuple[Student, StudentSpec]:
    """The student with item vectors = ID row (text folded in) + category, and no item bags."""
    if not model.item_text:
        return model, spec
    state = _state(model)
    state["item.weight"] += model.text_vectors(state.pop("item_bag_ids"), state.pop("item_bag_offsets"))
    spec = dataclasses.replace(spec, item_text=False)
    return S.from_state(spec, state).eval(), spec


def token_counts(spec: StudentSpec, bags: list[torch.Tensor]) -> torch.Tensor:
    """[vocab_size + ngram_buckets] how often each text-table id occurs in `bags` (flat id tensors,
    original ids as `models.student.text_bag` makes them)."""
    n = spec.vocab_size + spec.ngram_buckets
    ids = torch.cat([b.reshape(-1).long() for b in bags]) if bags else torch.zeros(0, dtype=torch.long)
    return torch.bincount(ids, minlength=n)[:n]


@torch.no_grad()
def prune_vocabulary(model: Student, spec: StudentSpec, counts: torch.Tensor, *, min_count: int = 1,
                     reserve: int = 0) -> tuple[Student, StudentSpec]:
    """The student whose text table keeps only the rows used `min_count` times (`counts`, from
    `token_counts`) and `reserve` more word pieces; the other ids share one row."""
    if model.text_rows is not None:
        raise ValueError("this student's vocabulary is already pruned")
    keep = counts >= max(min_count, 1)
    if reserve:
        spare = (~keep[:spec.vocab_size]).nonzero().squeeze(1)[:reserve]
        keep[spare] = True
    kept = keep.nonzero().squeeze(1)
    state = _state(model)
    table = state["text.weight"]
    dropped = table[~keep]
    shared = dropped.mean(0) if len(dropped) else torch.zeros(table.shape[1])
    state["text.weight"] = torch.cat([table[kept], shared[None]])
    state["text_rows"] = kept
    spec = dataclasses.replace(spec, text_rows_kept=len(kept))
    return S.from_state(spec, state).eval(), spec


def _top(score: torch.Tensor, keep: float) -> torch.Tensor:
    """Indices (ascending) of the max(1, round(keep * n)) largest entries of `score`."""
    k = max(1, round(keep * len(score)))
    return score.topk(k).indices.sort().values


@torch.no_grad()
def prune_units(model: Student, spec: StudentSpec, keep: float) -> tuple[Student, StudentSpec]:
    """The student keeping the `keep` fraction (0 < keep <= 1) of the CTR MLP's and the text classifiers'
    hidden units and of the text table's columns, each ranked by ||incoming weights|| * ||outgoing weights||."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must lie in (0, 1], got {keep}")
    s = _state(model)
    for mlp in ("ctr_mlp", *(f"classifiers.{t}" for t in spec.classes)):
        w_in, w_out = s[f"{mlp}.0.weight"], s[f"{mlp}.3.weight"]  # [H, in], [out, H]
        units = _top(w_in.norm(dim=1) * w_out.norm(dim=0), keep)
        s[f"{mlp}.0.weight"], s[f"{mlp}.0.bias"] = w_in[units], s[f"{mlp}.0.bias"][units]
        s[f"{mlp}.3.weight"] = w_out[:, units]
    cols = _top(s["text.weight"].norm(dim=0) * s["text_proj.weight"].norm(dim=0), keep)
    s["text.weight"], s["text_proj.weight"] = s["text.weight"][:, cols], s["text_proj.weight"][:, cols]
    hidden = {len(s[f"classifiers.{t}.0.bias"]) for t in spec.classes}  # one width: each keeps the same share
    spec = dataclasses.replace(spec, ctr_hidden=len(s["ctr_mlp.0.bias"]), class_hidden=hidden.pop() if hidden else None,
                               text_dim=len(cols))
    return S.from_state(spec, s).eval(), spec


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["fold_item_text", "token_counts", "prune_vocabulary", "prune_units", "params"]
