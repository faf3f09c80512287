"""The recommendation and CTR predictors (`evaluation`'s predictor functions) of any model with
`rec_scores(history, items)` and `ctr_logits(history, item, slot, items)`: the teacher, a member of
it and the student alike."""
from __future__ import annotations

import torch


def item_head_predictors(model, items, device="cpu") -> dict:
    """{"recommendation": f(history) -> scores, "ctr": f(history, item, slot) -> probabilities}, the
    item vectors given once."""
    def rec(hist):
        return model.rec_scores(hist.to(device), items).float().cpu().numpy()

    def ctr(hist, item, slot):
        return torch.sigmoid(model.ctr_logits(hist.to(device), item.to(device), slot.to(device), items).float()).cpu().numpy()

    return {"recommendation": rec, "ctr": ctr}
