"""One evaluation loop for every model (teacher, students, compressed variants): the model comes in
as predictor functions per task, the examples and the metrics are the same for all of them.

    predictors = {"recommendation": f(history [b, H]) -> scores [b, n_items] (numpy),
                  "ctr": f(history [b, H], item [b], slot [b]) -> click probabilities [b] (numpy),
                  "intent": f(texts: list[str]) -> predicted class ids [b] (numpy)}
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from . import metrics as M
from .data.examples import read_split
from .histories import pad_histories


def item_head_predictors(model, items: torch.Tensor, device="cpu") -> dict:
    """The recommendation and CTR predictors of any model with `rec_scores(history, items)` and
    `ctr_logits(history, item, slot, items)` (teacher and student alike), item vectors given once."""
    def rec(hist):
        return model.rec_scores(hist.to(device), items).float().cpu().numpy()

    def ctr(hist, item, slot):
        return torch.sigmoid(model.ctr_logits(hist.to(device), item.to(device), slot.to(device), items).float()).cpu().numpy()

    return {"recommendation": rec, "ctr": ctr}


def _pad(histories, max_history: int) -> torch.Tensor:
    """Left-padded to the longest history of the batch (at most max_history): every model here
    counts positions back from the most recent item, so less padding changes no score, only the time."""
    longest = max((len(h) for h in histories), default=1)
    return pad_histories(histories, max(1, min(max_history, longest)))


@torch.no_grad()
def evaluate(predictors: dict[str, Callable], prepare_dir: str, split: str, *, n_items: int, max_history: int,
             seed: int = 0, batch: int = 512) -> dict:
    """{task: {metric: value}} on one split, for the tasks in `predictors`."""
    out = {}
    if "recommendation" in predictors:
        df = read_split(prepare_dir, "recommendation", split)
        hists = [np.asarray(h, dtype=np.int64) for h in df["history"]]
        score = predictors["recommendation"]
        out["recommendation"] = M.evaluate_ranking(lambda a, b: score(_pad(hists[a:b], max_history)),
                                                   df["item"].to_numpy(np.int64), hists, n_items, seed, batch)
    if "ctr" in predictors:
        df = read_split(prepare_dir, "ctr", split)
        probs = [predictors["ctr"](_pad(part["history"], max_history),
                                   torch.as_tensor(part["item"].to_numpy(np.int64)),
                                   torch.as_tensor(part["slot"].fillna(-1).to_numpy(np.int64)))
                 for part in (df.iloc[a:a + 4 * batch] for a in range(0, len(df), 4 * batch))]
        out["ctr"] = M.ctr_metrics(df["label"].to_numpy(), np.concatenate(probs) if probs else np.zeros(0),
                                   df["user_id"].to_numpy())
    if "intent" in predictors:
        df = read_split(prepare_dir, "intent", split)
        texts = df["text"].tolist()
        preds = [predictors["intent"](texts[a:a + 128]) for a in range(0, len(texts), 128)]
        out["intent"] = M.intent_metrics(df["label"].to_numpy(), np.concatenate(preds) if preds else np.zeros(0))
    return out
