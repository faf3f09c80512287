"""Text classification: a shopper's text in, one of the task's classes out. A task of this kind
(intent, review sentiment) says where its texts and classes come from (`prepare`); everything else
is here: how the teacher labels texts (its logits over the classes), the student's text-bag
tensors and loss, evaluation, the TF-IDF + logistic regression baseline, and serving (one endpoint
per task, explanations by word occlusion).

The teacher gives each such task a fine-tuned encoder of its own (`models.teacher.TextTeacher`), and
the student a classifier head over its shared text bag (`models.student.Student.class_logits`).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from .. import baselines, storage
from .. import metrics as M
from ..data.examples import INTENT_SCHEMA, SPLITS, read_split
from ..data.tables import write_frame
from ..errors import StageError
from ..layout import PrepareDir
from ..lexical import text_features
from ..losses import ClassificationKD, class_balance_weights
from ..models.student import text_bag
from ..models.teacher import text_inputs
from . import fingerprint
from .base import LabelContext, Output, Task, column_tensor, fixed_list, stacked

PAIR_SCHEMA = pa.schema([("text", pa.string()), ("label", pa.string())])  # a task's (text, class name) pairs


class TextClassification(Task):
    """A text classification task; subclasses set `name` and write their examples in `prepare`."""

    score_metric = "macro_f1"
    metrics = ("accuracy", "macro_f1")
    teacher_inputs = ("text",)
    example_columns = ("example_id", "text", "label")
    label_fields = (pa.field("logits", pa.list_(pa.float32())),)
    reads_text = True
    classifies = True
    summary = "classify shopping texts"  # the endpoint's one line in the API's docs
    demo_texts: tuple[str, ...] = ()     # what `distillery serve --demo` sends it

    @property
    def endpoint(self) -> str:
        """The HTTP route that serves this task (`serving.api`)."""
        return f"/v1/{self.name}"

    def labels(self, prepare_dir: str) -> tuple[str, ...]:
        """The class names, in class-id order, that the prepare stage wrote for this task."""
        path = PrepareDir(prepare_dir).vocab(f"{self.name}_labels")
        return tuple(storage.read_json(path)) if storage.exists(path) else ()

    def write_examples(self, df, out, names: list[str]) -> dict[str, int]:
        """Write a prepared task's examples (`data.examples.INTENT_SCHEMA` rows with a `split`) per split
        and its class names; -> rows per split."""
        counts = {}
        for split in SPLITS:
            part = df[df["split"] == split]
            write_frame(part, out.examples(self.name, split), INTENT_SCHEMA)
            counts[split] = int(len(part))
        storage.write_json(out.vocab(f"{self.name}_labels"), list(names))
        return counts

    def fingerprints(self, batch: pa.Table) -> pa.Array:
        return fingerprint.of_texts(self.name, batch.column("text").to_pylist())

    def label(self, teacher, batch: pa.Table, ctx: LabelContext) -> dict[str, pa.Array]:
        if "input_ids" in batch.column_names:  # tokenized by Ray Data (`tokenize_batch`)
            return label_tokens(teacher, self.name, batch, pad_id=ctx.tokenizer.pad_token_id or 0, device=ctx.device)
        return label_texts(teacher, self.name, ctx.tokenizer, batch, max_length=ctx.cfg.teacher.max_length,
                           device=ctx.device)

    # ---------------------------------------------------------------- distillation
    def training_table(self, table: pa.Table, tokenizer, spec) -> pa.Table:
        """The text bag is built once here, not every step."""
        ids, offsets = text_bag(tokenizer, table.column("text").to_pylist(), max_length=spec.max_length,
                                buckets=spec.ngram_buckets)
        bounds = np.append(offsets.numpy(), len(ids)).astype(np.int32)
        return table.drop(["text"]).append_column(
            "bag", pa.ListArray.from_arrays(pa.array(bounds), pa.array(ids.numpy(), pa.int32())))

    def training_rows(self, table: pa.Table, kd: bool) -> pa.Table:
        """The no-KD baseline drops the rows without a gold class (label -1, e.g. transfer texts),
        which carry only the teacher's label."""
        return table if kd else table.filter(pc.greater_equal(table.column("label"), 0))

    def loss_context(self, table: pa.Table, spec) -> list[int]:
        """Training rows per class by the teacher's argmax: what a class-balanced soft term
        (`kd_class_power` > 0) weighs by."""
        picks = stacked(table, "logits", np.float32).argmax(1) if table.num_rows else torch.zeros(0, dtype=torch.long)
        return torch.bincount(picks, minlength=len(spec.classes[self.name])).tolist()

    def tensors(self, table: pa.Table, spec) -> dict[str, torch.Tensor]:
        bag = table.column("bag").combine_chunks()
        return {"bag_values": torch.from_numpy(pc.list_flatten(bag).to_numpy().astype(np.int64)),
                "bag_offsets": torch.from_numpy(bag.offsets.to_numpy().astype(np.int64)),
                "label": column_tensor(table, "label", np.int64), "teacher": stacked(table, "logits", np.float32)}

    def forward(self, model, batch: dict, items: torch.Tensor) -> tuple:
        return model.class_logits(self.name, batch["bag_ids"], batch["bag_offsets"]), batch["teacher"], batch["label"]

    def loss(self, cfg, kd: bool, context: list[int] | None = None) -> ClassificationKD:
        """context: the teacher's class counts (`loss_context`), which `kd_class_power` > 0 needs."""
        tc = self.settings(cfg)
        alpha, power = (tc.alpha if kd else 0.0), getattr(tc, "kd_class_power", 0.0)
        if power <= 0:
            return ClassificationKD(tc.temperature, alpha)
        if context is None:
            raise StageError(f"tasks.{self.name}.kd_class_power > 0 needs the teacher's class counts of the "
                             "training rows (Task.loss_context)")
        return ClassificationKD(tc.temperature, alpha, class_weight=class_balance_weights(torch.tensor(context), power))

    # ---------------------------------------------------------------- evaluation
    def predictor(self, model, items, text_logits, device):
        """texts -> predicted class ids, from `text_logits(task, texts)`."""
        return lambda texts: text_logits(self.name, texts).argmax(-1).cpu().numpy()

    def outputs(self, predict, prepare_dir: str, split: str, *, n_items: int, max_history: int, seed: int,
                batch: int) -> Output:
        """{"label" [N], "prediction" [N], "unit" [N]}; predict(texts) -> predicted class ids [b]."""
        df = read_split(prepare_dir, self.name, split)
        texts = df["text"].tolist()
        preds = [predict(texts[a:a + 128]) for a in range(0, len(texts), 128)]
        return {"label": df["label"].to_numpy(), "unit": np.arange(len(texts)),
                "prediction": np.concatenate(preds) if preds else np.zeros(0, np.int64)}

    def metrics_of(self, output: Output) -> dict[str, float]:
        return M.classification_metrics(output["label"], output["prediction"])

    def row_scorer(self, output: Output):
        label, prediction = output["label"], output["prediction"]
        return lambda rows: M.classification_metrics(label[rows], prediction[rows])[self.score_metric]

    # ---------------------------------------------------------------- latency
    def probe_request(self, row) -> str:
        return row["text"]

    def probe(self, model, payloads: list) -> None:
        model.text_logits(self.name, payloads).softmax(-1)

    def baselines(self, prepare_dir: str, split: str, seed: int) -> dict[str, dict[str, float]]:
        return {"tfidf_logreg": baselines.tfidf_classifier(prepare_dir, self.name, split, seed)}


# ------------------------------------------------------------------------------ labelling texts
def tokenize_batch(batch: pa.Table, *, tokenizer, max_length: int, buckets: int) -> pa.Table:
    """Ray Data map over text examples: texts -> unpadded word-piece ids (and hashed n-gram ids when
    the teacher has a lexical bag). In Ray Data tasks, tokenization runs on the cluster's spare CPUs
    while the workers run the teacher, instead of stalling each forward pass: on a GPU it was the
    bottleneck (see benchmarks/README.md)."""
    texts = [t or "" for t in batch.column("text").to_pylist()]  # truncation handles overlong ones
    cols = {name: batch.column(name) for name in ("example_id", "split", "fingerprint") if name in batch.column_names}
    cols |= {"input_ids": pa.array(tokenizer(texts, truncation=True, max_length=max_length)["input_ids"],
                                  pa.list_(pa.int32()))}
    if buckets:
        cols["bag_ids"] = pa.array([text_features(t, buckets) for t in texts], pa.list_(pa.int32()))
    return pa.table(cols)


def _pad_right(column, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """list<int> column -> ([B, longest] ids padded on the right with pad_id, [B, longest] mask)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = pc.list_value_length(arr).to_numpy().astype(np.int64)
    flat = pc.list_flatten(arr).to_numpy(zero_copy_only=False).astype(np.int64)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    cols = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    ids = np.full((len(lengths), max(int(lengths.max(initial=0)), 1)), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    ids[rows, cols], mask[rows, cols] = flat, 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


@torch.no_grad()
def label_tokens(teacher, task: str, batch: pa.Table, *, pad_id: int, device) -> dict:
    """`label_texts` over rows that `tokenize_batch` has tokenized."""
    input_ids, mask = _pad_right(batch.column("input_ids"), pad_id)
    inputs = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}
    if teacher.lexical_buckets:
        bag = batch.column("bag_ids").combine_chunks()
        inputs["bag_ids"] = torch.from_numpy(pc.list_flatten(bag).to_numpy(zero_copy_only=False).astype(np.int64)).to(device)
        inputs["bag_offsets"] = torch.from_numpy(bag.offsets.to_numpy()[:-1].astype(np.int64)).to(device)
    return {"logits": fixed_list(teacher.class_logits(task, **inputs).float().cpu().numpy(), pa.float32())}


@torch.no_grad()
def label_texts(teacher, task: str, tokenizer, batch: pa.Table, *, max_length: int, device, chunk: int = 32) -> dict:
    """Texts in chunks of similar length (each chunk pads to its longest text, not the batch's),
    logits returned in the batch's order."""
    texts = [t or "" for t in batch.column("text").to_pylist()]  # truncation handles overlong ones
    order = np.argsort([len(t) for t in texts], kind="stable")
    logits = []
    for a in range(0, len(texts), chunk):
        part = [texts[i] for i in order[a:a + chunk]]
        inputs = text_inputs(tokenizer, part, max_length=max_length, buckets=teacher.lexical_buckets, device=device)
        logits.append(teacher.class_logits(task, **inputs).float().cpu())
    out = torch.cat(logits).numpy() if logits else np.zeros((0, 1), np.float32)
    restored = np.empty_like(out)
    restored[order] = out
    return {"logits": fixed_list(restored, pa.float32())}
