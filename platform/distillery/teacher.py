"""The `teacher` stage: fine-tune the encoder and its three heads with Ray Train, then evaluate.

One optimizer step takes one batch of every enabled task. The intent texts (through the encoder,
the expensive part) make one pass per epoch and so set the number of steps; recommendation and
CTR take `teacher.batch_size` examples per step from seeded permutations of their train split,
however many passes that makes. Every epoch: refresh the item text
embeddings, train, validate, checkpoint (`ray.train.report`), and keep the best model in
RUN_DIR/teacher/model. Re-running after an interruption resumes from the last checkpoint.

Writes RUN_DIR/teacher/metrics.json: {"valid": ..., "test": ..., "baselines": ...}.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import baselines, evaluation, metrics as M, storage, trainstate
from .config import RunConfig
from .data.examples import read_items, vocab_size
from .progress import say
from .teacher_model import Teacher, load_backbone, pad_histories, set_threads, text_inputs

SCORE_METRIC = {"recommendation": "ndcg@10", "ctr": "auc", "intent": "macro_f1"}


def combined_score(valid: dict) -> float:
    """Mean over tasks of the metric that ranks models (NDCG@10, AUC, macro-F1)."""
    vals = [valid[t][m] for t, m in SCORE_METRIC.items() if t in valid and not math.isnan(valid[t][m])]
    return float(np.mean(vals)) if vals else float("nan")


# ------------------------------------------------------------------------------ model i/o
def model_meta(cfg: RunConfig, prepare_dir: str) -> dict:
    items = read_items(prepare_dir)
    labels = storage.read_json(storage.join(prepare_dir, "vocab", "intent_labels.json")) \
        if storage.exists(storage.join(prepare_dir, "vocab", "intent_labels.json")) else []
    cats = storage.read_json(storage.join(prepare_dir, "vocab", "categories.json"))
    return {"n_items": vocab_size(prepare_dir), "n_intents": len(labels), "intent_labels": labels,
            "n_categories": len(cats), "dim": cfg.teacher.dim, "max_history": cfg.tasks.recommendation.max_history,
            "max_length": cfg.teacher.max_length, "lexical_dim": cfg.teacher.lexical_dim,
            "lexical_buckets": cfg.teacher.lexical_buckets,
            "item_category": [0, 1] + items["category_idx"].tolist(), "tasks": list(cfg.tasks.enabled())}


def build(backbone, meta: dict) -> Teacher:
    return Teacher(backbone, n_items=meta["n_items"], n_intents=meta["n_intents"],
                   item_category=torch.tensor(meta["item_category"]), n_categories=meta["n_categories"],
                   dim=meta["dim"], max_history=meta["max_history"], lexical_dim=meta.get("lexical_dim", 0),
                   lexical_buckets=meta.get("lexical_buckets", 1 << 16))


def save_weights(model: nn.Module, path: str) -> None:
    """state_dict -> safetensors (never pickle)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, path)


def save_model(model: Teacher, tokenizer, meta: dict, out: str) -> None:
    """model.safetensors + backbone config/tokenizer + teacher.json; written locally, then copied."""
    with tempfile.TemporaryDirectory() as tmp:
        save_weights(model, os.path.join(tmp, "model.safetensors"))
        model.backbone.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "teacher.json"), "w") as f:
            json.dump(meta, f)
        storage.upload_dir(tmp, out)


def load_model(path: str, device: str = "cpu") -> tuple[Teacher, object, dict]:
    """The teacher saved by `save_model` (weights through safetensors only)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    with storage.local_copy(path) as local:
        meta = json.load(open(os.path.join(local, "teacher.json")))
        backbone = AutoModel.from_config(AutoConfig.from_pretrained(local))
        model = build(backbone, meta)
        model.load_state_dict(load_file(os.path.join(local, "model.safetensors")))
        tokenizer = AutoTokenizer.from_pretrained(local)
    return model.to(device).eval(), tokenizer, meta


# ------------------------------------------------------------------------------ evaluation
def predictors(model: Teacher, tokenizer, tasks, max_length: int, device="cpu") -> dict:
    """The teacher as `evaluation.evaluate`'s predictor functions (item vectors computed once)."""
    model.eval()
    with torch.no_grad():
        items = model.item_vectors()

    def intent(texts):
        inputs = text_inputs(tokenizer, texts, max_length=max_length, buckets=model.lexical_buckets, device=device)
        return model.intent_logits(**inputs).argmax(-1).cpu().numpy()

    return {t: f for t, f in {**evaluation.item_head_predictors(model, items, device), "intent": intent}.items()
            if t in tasks}


def evaluate(model: Teacher, tokenizer, prepare_dir: str, split: str, tasks, max_length: int,
             device="cpu", batch: int = 512, seed: int = 0) -> dict:
    """Metrics of `model` on one split of every task (the metric module's names)."""
    return evaluation.evaluate(predictors(model, tokenizer, tasks, max_length, device), prepare_dir, split,
                               n_items=model.item_text.shape[0], max_history=model.user_tower.pos.num_embeddings - 1,
                               seed=seed, batch=batch)


def item_token_batches(texts: list[str], tokenizer, max_length: int, device, batch: int = 128):
    for a in range(0, len(texts), batch):
        enc = tokenizer(texts[a:a + batch], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        ids = torch.arange(a, a + len(texts[a:a + batch])) + M.RESERVED
        yield ids.to(device), enc["input_ids"].to(device), enc["attention_mask"].to(device)


# ------------------------------------------------------------------------------ training
class MultiTaskLoss(nn.Module):
    """Wraps the teacher so one forward() returns every task's loss (what DDP synchronizes)."""

    def __init__(self, teacher: Teacher, weights: dict[str, float]):
        super().__init__()
        self.teacher, self.weights = teacher, weights

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        t, losses = self.teacher, {}
        items = t.item_vectors() if ("rec_history" in batch or "ctr_history" in batch) else None
        if "rec_history" in batch:
            scores = t.rec_scores(batch["rec_history"], items)
            losses["recommendation"] = F.cross_entropy(scores, batch["rec_target"])
        if "ctr_history" in batch:
            logits = t.ctr_logits(batch["ctr_history"], batch["ctr_item"], batch["ctr_slot"], items)
            losses["ctr"] = F.binary_cross_entropy_with_logits(logits, batch["ctr_label"])
        if "input_ids" in batch:
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "bag_ids", "bag_offsets") if k in batch}
            losses["intent"] = F.cross_entropy(t.intent_logits(**inputs), batch["intent_label"])
        losses["total"] = sum(self.weights[k] * v for k, v in losses.items())
        return losses


def _read_shard(shard):
    """This worker's shard of a task, read once: streaming three shards in lockstep every step
    cost ~1.5 s/step on 2 cores, more than the model itself for the small heads."""
    import pandas as pd

    parts = list(shard.iter_batches(batch_size=None, batch_format="pandas"))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def _batches(df, batch_size: int, seed: int):
    """Endless batches: passes over fresh seeded permutations, so a small task can be revisited
    several times while the intent texts make their one pass."""
    rng = np.random.default_rng(seed)
    while len(df):
        order = rng.permutation(len(df))
        for a in range(0, len(df) - batch_size + 1 if len(df) >= batch_size else 1, batch_size):
            yield df.iloc[order[a:a + batch_size]]


def add_typos(texts: list[str], rate: float, rng: np.random.Generator) -> list[str]:
    """One random edit (swap two neighbours, drop or double a character) in a `rate` share of the
    texts. Shoppers misspell queries, and an encoder fine-tuned on clean text alone is brittle to it."""
    out = []
    for text in texts:
        if len(text) > 3 and rng.random() < rate:
            i, op = int(rng.integers(0, len(text) - 1)), int(rng.integers(3))
            text = (text[:i] + text[i + 1] + text[i] + text[i + 2:], text[:i] + text[i + 1:],
                    text[:i] + text[i] + text[i:])[op]
        out.append(text)
    return out


def drop_words(texts: list[str], rate: float, rng: np.random.Generator) -> list[str]:
    """Cut a `rate` share of the texts to a random subset of their words (each kept with p=1/2, at
    least one). Queries are often one attribute or noun of a title ("mips", "neoprene"); without
    this the encoder learned those words only inside whole titles and missed them alone, where a
    bag-of-words baseline did not (see ARCHITECTURE.md for what it measured)."""
    out = []
    for text in texts:
        words = text.split()
        if len(words) > 1 and rng.random() < rate:
            kept = [w for w in words if rng.random() < 0.5]
            text = " ".join(kept or [words[int(rng.integers(len(words)))]])
        out.append(text)
    return out


def _to_tensors(task: str, df, tokenizer, cfg: RunConfig, device, rng: np.random.Generator | None = None) -> dict:
    if task == "recommendation":
        return {"rec_history": pad_histories(df["history"], cfg.tasks.recommendation.max_history).to(device),
                "rec_target": torch.as_tensor(df["item"].to_numpy(np.int64), device=device)}
    if task == "ctr":
        return {"ctr_history": pad_histories(df["history"], cfg.tasks.ctr.max_history).to(device),
                "ctr_item": torch.as_tensor(df["item"].to_numpy(np.int64), device=device),
                "ctr_slot": torch.as_tensor(df["slot"].fillna(-1).to_numpy(np.int64), device=device),
                "ctr_label": torch.as_tensor(df["label"].to_numpy(np.float32), device=device)}
    texts = df["text"].tolist()
    if rng is not None:  # training: augmented; evaluation and labeling see the texts as they are
        texts = add_typos(drop_words(texts, cfg.teacher.word_drop_augment, rng), cfg.teacher.typo_augment, rng)
    buckets = cfg.teacher.lexical_buckets if cfg.teacher.lexical_dim else 0
    return {**text_inputs(tokenizer, texts, max_length=cfg.teacher.max_length, buckets=buckets, device=device),
            "intent_label": torch.as_tensor(df["label"].to_numpy(np.int64), device=device)}


def train_loop(config: dict) -> None:
    """Ray Train worker function."""
    import ray.train
    import ray.train.torch

    cfg = RunConfig.model_validate(config["cfg"])
    prepare_dir, out_dir = config["prepare_dir"], config["out_dir"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    set_threads(cfg.teacher.cpus_per_worker)
    torch.manual_seed(cfg.seed + rank)
    device = ray.train.torch.get_device()
    tasks = [t for t in cfg.tasks.enabled()]
    counts = config["train_counts"]

    backbone, tokenizer = load_backbone(cfg.teacher.model)
    meta = model_meta(cfg, prepare_dir)
    teacher = build(backbone, meta)
    heads = [p for n, p in teacher.named_parameters() if not n.startswith(("backbone.", "lexical."))]
    groups = [{"params": list(teacher.backbone.parameters()), "lr": cfg.teacher.lr},
              {"params": heads, "lr": cfg.teacher.head_lr}]
    if teacher.lexical is not None:  # its rare n-gram rows see few updates: a rate of their own, no decay
        groups.append({"params": list(teacher.lexical.parameters()), "lr": cfg.teacher.lexical_lr, "weight_decay": 0.0})
    optim = torch.optim.AdamW(groups, weight_decay=cfg.teacher.weight_decay,
                              fused=True)  # one kernel per step instead of a loop over tensors
    steps = max(1, math.ceil(counts.get("intent", 0) / world / cfg.teacher.intent_batch_size)) if "intent" in tasks \
        else max(1, math.ceil(max(counts.values()) / world / cfg.teacher.batch_size))  # no intent: one pass of the largest task
    sizes = {t: cfg.teacher.intent_batch_size if t == "intent" else cfg.teacher.batch_size for t in tasks}
    total = steps * cfg.teacher.epochs
    sched = trainstate.warmup_linear(optim, total, cfg.teacher.warmup_ratio)
    state = {"epoch": 0, "best": -1.0, "bad_epochs": 0, "history": []}

    restored = trainstate.restore(teacher, optim, sched)
    if restored:
        state = restored
        if rank == 0:
            say(f"[teacher] resuming at epoch {state['epoch'] + 1} from the last checkpoint")
    teacher.to(device)
    loss_fn = MultiTaskLoss(teacher, {t: getattr(cfg.tasks, t).weight for t in tasks})
    model = ray.train.torch.prepare_model(loss_fn, parallel_strategy_kwargs={"find_unused_parameters": True}) \
        if world > 1 else loss_fn
    item_texts = read_items(prepare_dir)["text"].tolist()
    shards = {t: _read_shard(ray.train.get_dataset_shard(t)) for t in tasks}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    for epoch in range(state["epoch"], cfg.teacher.epochs):
        t0 = time.perf_counter()
        # dropout draws from the global generator: seeded per epoch, a run resumed from a checkpoint
        # trains its remaining epochs exactly as an uninterrupted run would
        torch.manual_seed(cfg.seed * 1000 + epoch * 10 + rank)
        teacher.refresh_items(item_token_batches(item_texts, tokenizer, cfg.teacher.max_length, device))
        t_items = time.perf_counter() - t0
        model.train()
        iters = {t: iter(_batches(shards[t], sizes[t], cfg.seed * 1000 + epoch)) for t in tasks}
        augment_rng = np.random.default_rng([cfg.seed, epoch, rank])
        sums, n = {}, 0
        for _ in range(steps):
            batch = {}
            try:
                for t in tasks:
                    batch.update(_to_tensors(t, next(iters[t]), tokenizer, cfg, device, augment_rng))
            except StopIteration:
                break
            with autocast:
                losses = model(batch)
            optim.zero_grad(set_to_none=True)
            losses["total"].backward()
            # Each group clipped apart: the encoder learns from intent alone, and one norm over everything
            # let the large recommendation gradients scale its updates down.
            for group in optim.param_groups:
                torch.nn.utils.clip_grad_norm_(group["params"], 1.0)
            optim.step()
            sched.step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            n += 1
        t_train = time.perf_counter() - t0 - t_items
        valid = evaluate(teacher, tokenizer, prepare_dir, "valid", tasks, cfg.teacher.max_length, device, seed=cfg.seed)
        score = combined_score(valid)
        improved = trainstate.record_epoch(state, epoch, score, valid, sums, n, time.perf_counter() - t0)
        if rank == 0:
            line = "  ".join(f"{t}:{m}={valid[t][m]:.4f}" for t, m in SCORE_METRIC.items() if t in valid)
            say(f"[teacher] epoch {epoch + 1}/{cfg.teacher.epochs}  loss={sums.get('total', 0) / max(n, 1):.4f}  "
                f"{line}  score={score:.4f}{'  *best' if improved else ''}  ({state['history'][-1]['seconds']}s: items "
                f"{t_items:.0f}s, {n} steps {t_train:.0f}s, valid {time.perf_counter() - t0 - t_items - t_train:.0f}s)")
            if improved:
                save_model(teacher, tokenizer, meta, storage.join(out_dir, "model"))
        trainstate.report_epoch(teacher, optim, sched, state, {"epoch": epoch + 1, "valid_score": score}, rank)
        if state["bad_epochs"] > cfg.teacher.patience:
            if rank == 0:
                say(f"[teacher] early stop: no better validation score for {state['bad_epochs']} epoch(s)")
            break
    if rank == 0:
        storage.write_json(storage.join(out_dir, "history.json"), state["history"])


# ------------------------------------------------------------------------------ the stage
def run(cfg: RunConfig, out_dir: str) -> dict:
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as TrainRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    prepare_dir = storage.join(cfg.run_dir, "prepare")
    tasks = cfg.tasks.enabled()
    load_backbone(cfg.teacher.model)  # fail here, with the path, not inside a worker
    # Read before the workers start: on a small machine a worker holding most CPUs would otherwise
    # starve the read tasks of its own input (they wait for CPU the worker never frees).
    datasets = {t: ray.data.read_parquet(storage.join(prepare_dir, "examples", t, "train")).materialize() for t in tasks}
    counts = {t: ds.count() for t, ds in datasets.items()}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "prepare_dir": prepare_dir, "out_dir": out_dir,
                           "train_counts": counts},
        datasets=datasets,
        scaling_config=ScalingConfig(num_workers=cfg.teacher.num_workers, use_gpu=cfg.teacher.use_gpu,
                                     resources_per_worker={"CPU": cfg.teacher.cpus_per_worker}),
        run_config=TrainRunConfig(name="teacher", storage_path=storage.join(out_dir, "ray_train"),
                                  failure_config=FailureConfig(max_failures=cfg.teacher.max_failures),
                                  checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    model, tokenizer, meta = load_model(storage.join(out_dir, "model"))
    history = storage.read_json(storage.join(out_dir, "history.json"))
    best = max(history, key=lambda h: h["score"])
    test = evaluate(model, tokenizer, prepare_dir, "test", tasks, cfg.teacher.max_length, seed=cfg.seed)
    report = {"valid": best["valid"], "test": test, "baselines": baselines.evaluate(prepare_dir, tuple(tasks), "test", cfg.seed),
              "best_epoch": best["epoch"] + 1, "epochs_run": len(history)}
    storage.write_json(storage.join(out_dir, "metrics.json"), report)
    print_metrics(report)
    storage.remove(storage.join(out_dir, "ray_train"))  # checkpoints only matter while the stage is unfinished
    return {"counts": {"train_examples": counts, "params": sum(p.numel() for p in model.parameters())},
            "best_epoch": report["best_epoch"], "valid_score": best["score"], "test": test}


def print_metrics(report: dict) -> None:
    print("[teacher] test metrics (teacher vs baseline):")
    for task, metric in SCORE_METRIC.items():
        if task in report["test"]:
            base = next(iter(report["baselines"][task].values()))
            name = next(iter(report["baselines"][task]))
            print(f"  {task:<15} {metric:<9} teacher={report['test'][task][metric]:.4f}  {name}={base[metric]:.4f}")
