"""Click-through rate: from a user's click history, the probability that she clicks a shown item
(in its slot); the teacher's label is its click logit."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from .. import baselines
from .. import metrics as M
from ..data.examples import read_split
from ..histories import pad_list_array, pad_to_longest, trim_padding
from ..losses import CtrKD
from ..models.student import longs
from . import fingerprint
from .base import LabelContext, Output, Task, column_tensor


class Ctr(Task):
    name = "ctr"
    score_metric = "auc"
    metrics = ("auc", "gauc", "logloss")
    per_user = True
    sequence_target = "click"
    teacher_inputs = ("history", "item", "slot")
    example_columns = ("example_id", "history", "item", "slot", "label")
    label_fields = (pa.field("logit", pa.float32()),)

    def fingerprints(self, batch: pa.Table) -> pa.Array:
        return fingerprint.of_histories(self.name, batch, slots=True)

    @torch.no_grad()
    def label(self, teacher, batch: pa.Table, ctx: LabelContext) -> dict[str, pa.Array]:
        device = ctx.device
        hist = trim_padding(pad_list_array(batch.column("history"), self.settings(ctx.cfg).max_history)).to(device)
        item = torch.as_tensor(batch.column("item").to_numpy(zero_copy_only=False).astype(np.int64), device=device)
        slot = torch.as_tensor(pc.fill_null(batch.column("slot"), -1).to_numpy().astype(np.int64), device=device)
        return {"logit": pa.array(teacher.ctr_logits(hist, item, slot, ctx.items).float().cpu().numpy())}

    # ---------------------------------------------------------------- distillation
    def tensors(self, table: pa.Table, spec) -> dict[str, torch.Tensor]:
        return {"history": pad_list_array(table.column("history"), spec.ctr_history),
                "item": column_tensor(table, "item", np.int64),
                "slot": torch.from_numpy(pc.fill_null(table.column("slot"), -1).to_numpy().astype(np.int64)),
                "label": column_tensor(table, "label", np.float32), "teacher": column_tensor(table, "logit", np.float32)}

    def forward(self, model, batch: dict, items: torch.Tensor) -> tuple:
        return model.ctr_logits(batch["history"], batch["item"], batch["slot"], items), batch["teacher"], batch["label"]

    def loss(self, cfg, kd: bool, context=None) -> CtrKD:
        tc = self.settings(cfg)
        return CtrKD(tc.temperature, tc.alpha if kd else 0.0)

    # ---------------------------------------------------------------- evaluation
    def predictor(self, model, items, text_logits, device):
        return lambda hist, item, slot: torch.sigmoid(
            model.ctr_logits(hist.to(device), item.to(device), slot.to(device), items).float()).cpu().numpy()

    def outputs(self, predict, prepare_dir: str, split: str, *, n_items: int, max_history: int, seed: int,
                batch: int) -> Output:
        """{"label" [N], "prob" [N], "unit" [N] (the user: her candidates go together)};
        predict(history [b, H], item [b], slot [b]) -> click probabilities [b]."""
        df = read_split(prepare_dir, self.name, split)
        probs = [predict(pad_to_longest(part["history"], max_history),
                         torch.as_tensor(part["item"].to_numpy(np.int64)),
                         torch.as_tensor(part["slot"].fillna(-1).to_numpy(np.int64)))
                 for part in (df.iloc[a:a + 4 * batch] for a in range(0, len(df), 4 * batch))]
        return {"label": df["label"].to_numpy(), "prob": np.concatenate(probs) if probs else np.zeros(0),
                "unit": df["user_id"].to_numpy()}

    def metrics_of(self, output: Output) -> dict[str, float]:
        return M.ctr_metrics(output["label"], output["prob"], output["unit"])

    def row_scorer(self, output: Output):
        return M.auc_of_rows(output["label"], output["prob"])

    # ---------------------------------------------------------------- latency
    def probe_request(self, row) -> tuple[list[int], int, int]:
        return list(row["history"]), int(row["item"]), -1 if row["slot"] != row["slot"] else int(row["slot"])

    def probe(self, model, payloads: list) -> None:
        torch.sigmoid(model.ctr_logits(model.histories([p[0] for p in payloads], model.ctr_history),
                                       longs([p[1] for p in payloads]), longs([p[2] for p in payloads])))

    def baselines(self, prepare_dir: str, split: str, seed: int) -> dict[str, dict[str, float]]:
        return {"popularity": baselines.popularity_ctr(prepare_dir, self.name, split)}


TASK = Ctr()
