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
def outputs(predictors: dict[str, Callable], prepare_dir: str, split: str, *, n_items: int, max_history: int,
            seed: int = 0, batch: int = 512) -> dict[str, dict[str, np.ndarray]]:
    """Per-example outputs on one split, for the tasks in `predictors` (`metrics_of` turns them into
    metrics; `row_scorer` scores any subset of rows, as a bootstrap needs):
        recommendation: {"rank" [N], "rank_sampled100" [N] (`metrics.ranking_ranks`: when 100 negatives can be drawn), "unit" [N]}
        ctr:            {"label" [N], "prob" [N], "unit" [N] (the user: her candidates go together)}
        intent:         {"label" [N], "prediction" [N], "unit" [N]}"""
    out = {}
    if "recommendation" in predictors:
        df = read_split(prepare_dir, "recommendation", split)
        hists = [np.asarray(h, dtype=np.int64) for h in df["history"]]
        score = predictors["recommendation"]
        full, sampled = M.ranking_ranks(lambda a, b: score(_pad(hists[a:b], max_history)),
                                        df["item"].to_numpy(np.int64), hists, n_items, seed, batch)
        out["recommendation"] = {"rank": full, "unit": np.arange(len(full)),
                                 **({} if sampled is None else {"rank_sampled100": sampled})}
    if "ctr" in predictors:
        df = read_split(prepare_dir, "ctr", split)
        probs = [predictors["ctr"](_pad(part["history"], max_history),
                                   torch.as_tensor(part["item"].to_numpy(np.int64)),
                                   torch.as_tensor(part["slot"].fillna(-1).to_numpy(np.int64)))
                 for part in (df.iloc[a:a + 4 * batch] for a in range(0, len(df), 4 * batch))]
        out["ctr"] = {"label": df["label"].to_numpy(), "prob": np.concatenate(probs) if probs else np.zeros(0),
                      "unit": df["user_id"].to_numpy()}
    if "intent" in predictors:
        df = read_split(prepare_dir, "intent", split)
        texts = df["text"].tolist()
        preds = [predictors["intent"](texts[a:a + 128]) for a in range(0, len(texts), 128)]
        out["intent"] = {"label": df["label"].to_numpy(), "unit": np.arange(len(texts)),
                         "prediction": np.concatenate(preds) if preds else np.zeros(0, np.int64)}
    return out


def metrics_of(outputs: dict[str, dict[str, np.ndarray]]) -> dict:
    """`outputs`' per-example arrays -> {task: {metric: value}} (the metric module's names)."""
    out = {}
    if "recommendation" in outputs:
        o = outputs["recommendation"]
        out["recommendation"] = M.ranking_metrics_of(o["rank"], o.get("rank_sampled100"))
    if "ctr" in outputs:
        o = outputs["ctr"]
        out["ctr"] = M.ctr_metrics(o["label"], o["prob"], o["unit"])
    if "intent" in outputs:
        o = outputs["intent"]
        out["intent"] = M.intent_metrics(o["label"], o["prediction"])
    return out


def row_scorer(task: str, output: dict[str, np.ndarray]) -> Callable[[np.ndarray], float]:
    """-> f(rows) = SCORE_METRIC[task] over those rows of one task's `outputs` (rows may repeat)."""
    if task == "recommendation":
        ranks = output["rank"]
        return lambda rows: M.ranking_metrics(ranks[rows])[M.SCORE_METRIC[task]]
    if task == "ctr":
        return M.auc_of_rows(output["label"], output["prob"])
    label, prediction = output["label"], output["prediction"]
    return lambda rows: M.intent_metrics(label[rows], prediction[rows])[M.SCORE_METRIC[task]]


def ratio_intervals(model: dict, reference: dict, *, resamples: int = 1000, level: float = 0.95,
                    seed: int = 0) -> dict[str, dict]:
    """{task: `metrics.paired_ratio_interval` of model / reference on SCORE_METRIC[task]} over the
    tasks both `outputs` (of the same split) hold: e.g. how much of the teacher a student keeps,
    with how much of that the test split's size leaves uncertain."""
    out = {}
    for t in [t for t in model if t in reference]:
        if not np.array_equal(model[t]["unit"], reference[t]["unit"]):
            raise ValueError(f"{t}: the two models' outputs are not of the same examples")
        out[t] = {"metric": M.SCORE_METRIC[t],
                  **M.paired_ratio_interval(row_scorer(t, model[t]), row_scorer(t, reference[t]), model[t]["unit"],
                                            resamples=resamples, level=level, seed=seed)}
    return out


def evaluate(predictors: dict[str, Callable], prepare_dir: str, split: str, *, n_items: int, max_history: int,
             seed: int = 0, batch: int = 512) -> dict:
    """{task: {metric: value}} on one split, for the tasks in `predictors`."""
    return metrics_of(outputs(predictors, prepare_dir, split, n_items=n_items, max_history=max_history,
                              seed=seed, batch=batch))
