"""The teacher's text classifiers: an encoder and its lexical bag fine-tuned on one text task's
examples, as a training job."""
from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd
import torch

from .. import evaluation, loop, trainstate, training
from ..config import RunConfig
from ..layout import PartDir
from ..losses import ClassifierLoss
from ..models.teacher import TextTeacher, load_backbone, save_weights, text_inputs
from ..tasks import TASKS
from .augment import add_typos, drop_words


def optimizer(model: TextTeacher, tc) -> torch.optim.AdamW:
    """AdamW with the encoder, the head and the lexical bag each at its own rate."""
    groups = [{"params": list(model.backbone.parameters()), "lr": tc.lr},
              {"params": list(model.head.parameters()), "lr": tc.head_lr}]
    if model.lexical is not None:  # its rare n-gram rows see few updates: a rate of their own, no decay
        groups.append({"params": list(model.lexical.parameters()), "lr": tc.lexical_lr, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, weight_decay=tc.weight_decay, fused=True)  # one kernel, not a loop over tensors


def batches(df: pd.DataFrame, tokenizer, tc, steps: int, device) -> Callable:
    """An epoch for `loop.fit`: `steps` batches of `tc.intent_batch_size` texts bucketed by length
    (sorted with jitter, cut, taken in random order): each pads to its longest text, and titles range
    from a few tokens to max_length. A shard shorter than the others repeats texts."""
    lengths = df["text"].str.len().to_numpy(float) if len(df) else np.zeros(0)
    buckets = tc.lexical_buckets if tc.lexical_dim else 0

    def epoch(gen: torch.Generator):
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=gen)))
        bs = tc.intent_batch_size
        idx = np.arange(steps * bs) % max(len(df), 1)
        idx = rng.permutation(len(df))[idx] if len(df) else idx
        idx = idx[np.argsort(lengths[idx] * rng.uniform(0.8, 1.25, len(idx)), kind="stable")]
        for i in rng.permutation(steps) if len(df) else []:
            rows = df.iloc[idx[i * bs:(i + 1) * bs]]
            texts = add_typos(drop_words(rows["text"].tolist(), tc.word_drop_augment, rng), tc.typo_augment, rng)
            yield {**text_inputs(tokenizer, texts, max_length=tc.max_length, buckets=buckets, device=device),
                   "label": torch.as_tensor(rows["label"].to_numpy(np.int64), device=device)}
    return epoch


def shard(task: str) -> pd.DataFrame:
    """This Train worker's shard of `task`'s train examples (text, label), in example id order."""
    table = training.read_shard(task, sort_by="example_id")
    return table.to_pandas() if table is not None else pd.DataFrame({"text": [], "label": []})


def job(cfg: RunConfig, task: str, n_classes: int, out_dir: str, worker: training.Worker, *, prepare_dir: str,
        steps: int, df: pd.DataFrame) -> training.Job:
    """The training job of `task`'s classifier on `worker`: `df` is the worker's shard of the texts,
    `steps` an epoch's batches; its best weights and history go to `out_dir`."""
    tc = cfg.teacher
    torch.manual_seed(loop.epoch_seed(cfg.seed, 0, 0, stream=1))  # same initial head on every rank
    backbone, tokenizer = load_backbone(tc.model)
    model = TextTeacher(backbone, n_classes, tc.lexical_dim, tc.lexical_buckets)
    buckets = tc.lexical_buckets if tc.lexical_dim else 0
    device, spec = worker.device, TASKS[task]

    def validate():
        def text_logits(_, texts):
            return model(**text_inputs(tokenizer, texts, max_length=tc.max_length, buckets=buckets, device=device))
        valid = evaluation.evaluate(evaluation.predictors(model, [task], text_logits, device), prepare_dir, "valid",
                                    n_items=0, max_history=1, seed=cfg.seed)
        return valid[task][spec.score_metric], valid

    def describe(entry: dict) -> str:
        return "  ".join(f"{m}={entry['valid'][task][m]:.4f}" for m in spec.metrics)

    return training.Job(
        name=task, stage="teacher", model=model, loss=ClassifierLoss(model),
        optimizer=lambda m: optimizer(m, tc),
        schedule=lambda optim: trainstate.warmup_linear(optim, steps * tc.epochs, tc.warmup_ratio),
        plan=loop.Plan(epochs=tc.epochs, patience=tc.patience, eval_every=1, clip=1.0, seed=cfg.seed),
        batches=batches(df, tokenizer, tc, steps, device), validate=validate,
        save=lambda: save_weights(model, PartDir(out_dir).weights), history=PartDir(out_dir).history,
        describe=describe)
