"""Next-item recommendation: from a user's click history, rank the whole catalogue; the teacher's
labels are its top-K items and their scores (history masked, as the ranking metrics mask it)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from .. import baselines
from .. import metrics as M
from ..data.examples import read_split
from ..histories import pad_list_array, pad_to_longest, trim_padding
from ..losses import RecommendationKD
from . import fingerprint
from .base import LabelContext, Output, Task, column_tensor, fixed_list, stacked


class Recommendation(Task):
    name = "recommendation"
    score_metric = "ndcg@10"
    metrics = ("hr@10", "ndcg@10", "mrr", "hr@10_sampled100", "ndcg@10_sampled100")
    per_user = True
    sequence_target = "next_item"
    teacher_inputs = ("history", "item")
    example_columns = ("example_id", "history", "item")
    tuned = ("rank_weight",)
    label_fields = (pa.field("top_ids", pa.list_(pa.int32())), pa.field("top_scores", pa.list_(pa.float32())),
                    pa.field("target_score", pa.float32()))

    def fingerprints(self, batch: pa.Table) -> pa.Array:
        return fingerprint.of_histories(self.name, batch, slots=False)

    @torch.no_grad()
    def label(self, teacher, batch: pa.Table, ctx: LabelContext) -> dict[str, pa.Array]:
        """The teacher's top-K over the catalogue (history masked) and its score of the true next item."""
        hist = trim_padding(pad_list_array(batch.column("history"), ctx.spec.max_history)).to(ctx.device)
        target = torch.as_tensor(batch.column("item").to_numpy(zero_copy_only=False).astype(np.int64), device=ctx.device)
        scores = teacher.rec_scores(hist, ctx.items).float()
        target_score = scores.gather(1, target[:, None]).squeeze(1)
        scores.scatter_(1, hist, float("-inf"))  # pads (id 0) are -inf already
        k = min(ctx.cfg.label.top_k, scores.shape[1] - 2)
        top = scores.topk(k, dim=1)
        return {"top_ids": fixed_list(top.indices.cpu().numpy().astype(np.int32), pa.int32()),
                "top_scores": fixed_list(top.values.cpu().numpy().astype(np.float32), pa.float32()),
                "target_score": pa.array(target_score.cpu().numpy().astype(np.float32))}

    # ---------------------------------------------------------------- distillation
    def tensors(self, table: pa.Table, spec) -> dict[str, torch.Tensor]:
        return {"history": pad_list_array(table.column("history"), spec.max_history),
                "target": column_tensor(table, "item", np.int64), "top_ids": stacked(table, "top_ids", np.int64),
                # a list longer than the unseen catalogue ends in masked (-inf) scores: weight ~0, not NaN
                "top_scores": stacked(table, "top_scores", np.float32).clamp(min=-1e4)}

    def forward(self, model, batch: dict, items: torch.Tensor) -> tuple:
        return model.rec_scores(batch["history"], items), batch["target"], batch["top_ids"], batch["top_scores"]

    def loss(self, cfg, kd: bool, context=None) -> RecommendationKD:
        tc = self.settings(cfg)
        return RecommendationKD(tc.temperature, tc.alpha if kd else 0.0, rank_weight=tc.rank_weight,
                                rank_k=min(tc.rank_k, cfg.label.top_k), rank_lambda=tc.rank_lambda)

    # ---------------------------------------------------------------- evaluation
    def predictor(self, model, items, text_logits, device):
        return lambda hist: model.rec_scores(hist.to(device), items).float().cpu().numpy()

    def outputs(self, predict, prepare_dir: str, split: str, *, n_items: int, max_history: int, seed: int,
                batch: int) -> Output:
        """{"rank" [N], "rank_sampled100" [N] (`metrics.ranking_ranks`: when 100 negatives can be
        drawn), "unit" [N]}; predict(history [b, H]) -> scores [b, n_items]."""
        df = read_split(prepare_dir, self.name, split)
        hists = [np.asarray(h, dtype=np.int64) for h in df["history"]]
        full, sampled = M.ranking_ranks(lambda a, b: predict(pad_to_longest(hists[a:b], max_history)),
                                        df["item"].to_numpy(np.int64), hists, n_items, seed, batch)
        return {"rank": full, "unit": np.arange(len(full)), **({} if sampled is None else {"rank_sampled100": sampled})}

    def metrics_of(self, output: Output) -> dict[str, float]:
        return M.ranking_metrics_of(output["rank"], output.get("rank_sampled100"))

    def row_scorer(self, output: Output):
        ranks = output["rank"]
        return lambda rows: M.ranking_metrics(ranks[rows])[self.score_metric]

    # ---------------------------------------------------------------- latency
    def probe_request(self, row) -> list[int]:
        return list(row["history"])

    def probe(self, model, payloads: list) -> None:
        model.rec_scores(model.histories(payloads, model.rec_history)).topk(10, dim=1)

    def baselines(self, prepare_dir: str, split: str, seed: int) -> dict[str, dict[str, float]]:
        return {"popularity": baselines.popularity_ranking(prepare_dir, self.name, split, seed)}


TASK = Recommendation()
