"""The `teacher` stage: train the teacher and the baselines it must beat, then evaluate them all.

Steps, each kept when finished and the stage is re-run:
1. item text: the frozen encoder embeds every item's text once (a Ray task, on a GPU when
   `teacher.use_gpu`) -> RUN_DIR/teacher/item_text.safetensors.
2. the SASRec baseline: one ID-only sequence model per (dim, dropout) of `teacher.sasrec`, each
   trained until validation NDCG@10 stops improving -> RUN_DIR/teacher/sasrec/<name>/.
3. the sequence teacher: text+ID sequence models with their CTR heads, one per (width, dropout)
   of `teacher.sequence`, the same loop (`loop.fit`) -> RUN_DIR/teacher/members/<name>/. Per
   width, the dropout with the best validation score is kept, and `members` - 1 more seeds of it
   are trained; the kept models are the teacher's ensemble.
4. text classification (intent, sentiment): per task, an encoder and its lexical bag fine-tuned
   on the task's texts until its validation score stops improving -> RUN_DIR/teacher/<task>/.
   Steps 2-4 are one Ray Train run that trains the models one after another (a Train run costs
   ~10 s to start on a small machine); the extra seeds of step 3 are a second one.
Then the parts are assembled into one `Teacher` (RUN_DIR/teacher/model/) and every model is
evaluated on the test split: RUN_DIR/teacher/metrics.json =
{"valid", "test", "baselines": {task: {name: metrics}}, "sasrec_grid": [...], "teacher_grid": [...], ...}.
"""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from torch import nn

from .. import evaluation, loop, storage, trainstate, warmstart
from ..config import RunConfig
from ..data.examples import read_items, read_split, vocab_size
from ..data.sources import read_parquet
from ..errors import StageError
from ..histories import pad_list_array
from ..layout import PartDir, PrepareDir, RunLayout, TeacherDir
from ..models.seqrec import NextItemLoss, SeqSpec
from ..models.teacher import (
    TextTeacher,
    SeqMember,
    Teacher,
    TeacherSpec,
    build,
    build_member,
    load_backbone,
    load_model,
    load_weights,
    save_model,
    save_weights,
    set_threads,
    text_inputs,
)
from ..progress import say
from ..tasks import SCORE_METRIC, TASKS, baselines, mean_metric

SEQ_TASKS = ("recommendation", "ctr")


# ------------------------------------------------------------------------------ the run's shapes
def seq_spec(cfg: RunConfig, n_items: int, text_dim: int, *, dim: int, dropout: float,
             item_text: bool | None = None) -> SeqSpec:
    """A sequence model of this run at one point of a grid (`item_text=False`: the ID-only SASRec)."""
    sc = cfg.teacher.sequence
    use_text = sc.item_text if item_text is None else item_text
    return SeqSpec(n_items=n_items, dim=dim, layers=sc.layers, heads=sc.heads, dropout=dropout,
                   max_history=max(cfg.tasks.recommendation.max_history, cfg.tasks.ctr.max_history),
                   text_dim=text_dim if use_text else 0, use_id=sc.item_ids or not use_text,
                   adaptor_hidden=sc.adaptor_hidden if use_text else 0)


def member_name(dim: int, dropout: float, seed_index: int, members: int) -> str:
    """A teacher member's part name (its folder under RUN_DIR/teacher/members/)."""
    return f"teacher-d{dim}-p{dropout:g}" + (f"-s{seed_index}" if members > 1 else "")


def teacher_spec(cfg: RunConfig, prepare_dir: str, text_dim: int,
                 sequences: tuple[SeqSpec, ...] | None = None) -> TeacherSpec:
    """The teacher this run trains (`text_dim`: the encoder's width). `sequences`: its members, known
    once the grid has trained and chosen; by default one per width and seed at the first dropout."""
    items = read_items(prepare_dir)
    prep = PrepareDir(prepare_dir)
    cats = storage.read_json(prep.vocab("categories"))
    tasks = list(cfg.tasks.enabled())
    sc, n_items = cfg.teacher.sequence, vocab_size(prepare_dir)
    if sequences is None:
        sequences = [seq_spec(cfg, n_items, text_dim, dim=d, dropout=sc.dropouts[0]) for d in sc.dims
                     for _ in range(sc.members)]
    classes = {t: TASKS[t].labels(prepare_dir) for t in tasks if TASKS[t].classifies}
    return TeacherSpec(n_items=n_items, classes=classes, n_categories=len(cats),
                       max_history=max(cfg.tasks.recommendation.max_history, cfg.tasks.ctr.max_history),
                       max_length=cfg.teacher.max_length, lexical_dim=cfg.teacher.lexical_dim,
                       lexical_buckets=cfg.teacher.lexical_buckets,
                       item_category=(0, 1, *items["category_idx"].tolist()), tasks=tuple(tasks),
                       sequences=tuple(sequences) if set(tasks) & set(SEQ_TASKS) else ())


# ------------------------------------------------------------------------------ evaluation
def evaluate(model: Teacher, tokenizer, prepare_dir: str, split: str, tasks, max_length: int,
             device="cpu", batch: int = 512, seed: int = 0) -> dict:
    """Metrics of `model` on one split of every task (the metric module's names)."""
    return evaluation.evaluate(evaluation.teacher_predictors(model, tokenizer, tasks, max_length, device), prepare_dir, split,
                               n_items=vocab_size(prepare_dir), max_history=model.max_history, seed=seed, batch=batch)


def evaluate_member(member: SeqMember, prepare_dir: str, split: str, tasks, n_items: int, max_history: int,
                    seed: int = 0, device="cpu") -> dict:
    return evaluation.evaluate(evaluation.predictors(member, tasks, device=device), prepare_dir, split, n_items=n_items,
                               max_history=max_history, seed=seed)


# ------------------------------------------------------------------------------ 1. item text
def encode_items(model_name: str, texts: list[str], max_length: int, device: str = "cpu",
                 batch: int = 128) -> torch.Tensor:
    """[2 + len(texts), H] mean-pooled embeddings of the frozen encoder (rows 0, 1: zeros)."""
    from ..models.teacher import mean_pool

    backbone, tokenizer = load_backbone(model_name)
    backbone.to(device).eval()
    out = torch.zeros(len(texts) + 2, backbone.config.hidden_size)
    with torch.no_grad():
        for a in range(0, len(texts), batch):
            enc = tokenizer([t or "" for t in texts[a:a + batch]], padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt").to(device)
            h = backbone(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            out[2 + a:2 + a + len(h)] = mean_pool(h, enc["attention_mask"]).float().cpu()
    return out


def item_text_embeddings(cfg: RunConfig, out_dir: str) -> torch.Tensor:
    """The item text embeddings of this run: computed once, as a Ray task, and kept in out_dir."""
    import ray

    path = TeacherDir(out_dir).item_text
    if storage.exists(path):
        return load_weights(path)["item_text"]
    texts = read_items(RunLayout(cfg.run_dir).prepare.root)["text"].tolist()
    t0 = time.perf_counter()
    task = ray.remote(num_cpus=cfg.teacher.cpus_per_worker, num_gpus=1 if cfg.teacher.use_gpu else 0)(_encode_task)
    emb = ray.get(task.remote(cfg.teacher.model, texts, cfg.teacher.max_length, cfg.teacher.use_gpu,
                              cfg.teacher.cpus_per_worker))
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        save_file({"item_text": emb.contiguous()}, os.path.join(tmp, "e.safetensors"))
        storage.upload_file(os.path.join(tmp, "e.safetensors"), path)
    say(f"[teacher] item text: {len(texts):,} items embedded by the frozen encoder in {time.perf_counter() - t0:.0f}s")
    return emb


def _encode_task(model_name: str, texts: list[str], max_length: int, use_gpu: bool, cpus: float) -> torch.Tensor:
    set_threads(cpus)
    return encode_items(model_name, texts, max_length, "cuda" if use_gpu else "cpu")


# ------------------------------------------------------------------------------ 2-3. sequence models
def user_sequences(rec_train: pd.DataFrame) -> pa.Table:
    """One row per user: `sequence` = the user's train items in order (the history of the user's
    last train example, already cut to max_history by prepare, and its target). Example ids are
    prepare's `rec:{user}:{t}`, t = the target's position in the user's clicks."""
    schema = pa.schema([("user_id", pa.string()), ("sequence", pa.list_(pa.int32()))])
    if rec_train.empty:
        return schema.empty_table()
    t = rec_train["example_id"].str.rsplit(":", n=1).str[1].astype(np.int64)
    last = rec_train.assign(_t=t).sort_values(["user_id", "_t"]).groupby("user_id", sort=False).tail(1)
    seqs = [[*map(int, h), int(i)] for h, i in zip(last["history"], last["item"])]
    return pa.table({"user_id": last["user_id"].astype(str).tolist(), "sequence": seqs}, schema=schema)


class MemberLoss(nn.Module):
    """One step's losses of a sequence member (what DDP synchronizes): next-item cross entropy at
    every position of the batch's sequences, and BCE of the CTR head, weighted by the task weights.
    With `ctr_trains_encoder` False the CTR loss stops at the head's inputs (user state, candidate
    vector): on Office, letting it into the sequence model cost validation NDCG@10."""

    def __init__(self, member: SeqMember, next_item: NextItemLoss, weights: dict[str, float],
                 ctr_trains_encoder: bool = False):
        super().__init__()
        self.member, self.next_item, self.weights = member, next_item, weights
        self.ctr_trains_encoder = ctr_trains_encoder

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        items = self.member.item_vectors()
        out = {}
        if "sequences" in batch:
            seqs = batch["sequences"]
            states = self.member.seq.states(seqs[:, :-1], items)
            out["recommendation"] = self.next_item(states, seqs[:, 1:], items, batch.get("generator")) \
                * batch.get("sequence_weight", 1.0)
        if "ctr_history" in batch:
            if self.member.ctr is not None and not self.ctr_trains_encoder:
                user = self.member.seq.user_vectors(batch["ctr_history"], items).detach()
                logits = self.member.ctr(user, items[batch["ctr_item"]].detach(), batch["ctr_item"], batch["ctr_slot"])
            else:
                logits = self.member.ctr_logits(batch["ctr_history"], batch["ctr_item"], batch["ctr_slot"], items)
            out["ctr"] = F.binary_cross_entropy_with_logits(logits, batch["ctr_label"])
        # started from a zero tied to the weights: a batch with no rows (a shard smaller than the
        # epoch's steps) still has a loss to backpropagate and to synchronize
        out["total"] = sum((self.weights[k] * v for k, v in out.items()), items.sum() * 0.0)
        return out


def sequence_batches(seqs: torch.Tensor, ctr: dict | None, steps: int, ctr_batch: int, gen: torch.Generator,
                     device, per_target: bool = False) -> list[dict]:
    """One epoch: `steps` batches. Sequences are bucketed by length (sorted with jitter, then cut
    into `steps` chunks taken in random order), each batch trimmed to its longest sequence: with a
    median history of a few items, padding to max_history would be most of the compute. With
    `per_target`, a batch's `sequence_weight` is its next-item targets over the epoch's mean per
    batch, so that the weighted mean losses weigh every target alike. CTR rows are drawn from a
    permutation of the shard."""
    out = [{} for _ in range(steps)]
    if seqs is not None and len(seqs):
        lengths = (seqs != 0).sum(1).float()
        order = torch.argsort(lengths + 4 * torch.rand(len(seqs), generator=gen))
        chunks = torch.tensor_split(order, steps)
        for i, j in enumerate(torch.randperm(steps, generator=gen).tolist()):
            s = seqs[chunks[j]]
            if len(s):
                longest = max(int((s != 0).sum(1).max()), 2)
                out[i]["sequences"] = s[:, -longest:].to(device)
        if per_target:
            targets = [int((b["sequences"][:, 1:] != 0).sum()) if "sequences" in b else 0 for b in out]
            mean = sum(targets) / steps
            for b, n in zip(out, targets):
                if n:
                    b["sequence_weight"] = n / mean
    if ctr is not None and len(ctr["label"]):
        n = len(ctr["label"])
        need = steps * min(ctr_batch, n)
        idx = torch.cat([torch.randperm(n, generator=gen) for _ in range(math.ceil(need / n))])[:need]
        for i, rows in enumerate(torch.split(idx, min(ctr_batch, n))):
            batch = {f"ctr_{k}": v[rows] for k, v in ctr.items()}
            longest = max(int((batch["ctr_history"] != 0).sum(1).max()), 1)
            batch["ctr_history"] = batch["ctr_history"][:, -longest:]  # left-padded: the padding goes
            out[i].update({k: v.to(device) for k, v in batch.items()})
    for b in out:
        b["generator"] = gen
    return out


def _sequence_shards(tasks, sequence_length: int, ctr_history: int) -> tuple:
    """This worker's (padded train sequences [N, sequence_length] or None, CTR tensors or None)."""
    import ray.train

    def shard(name):
        parts = list(ray.train.get_dataset_shard(name).iter_batches(batch_size=None, batch_format="pyarrow"))
        return pa.concat_tables(parts) if parts else None

    seqs = ctr = None
    if "recommendation" in tasks and (t := shard("sequences")) is not None:
        seqs = pad_list_array(t.column("sequence"), sequence_length)
    if "ctr" in tasks and (t := shard("ctr")) is not None:
        ctr = {"history": pad_list_array(t.column("history"), ctr_history),
               "item": torch.from_numpy(t.column("item").to_numpy().astype(np.int64)),
               "slot": torch.from_numpy(pc.fill_null(t.column("slot"), -1).to_numpy().astype(np.int64)),
               "label": torch.from_numpy(t.column("label").to_numpy().astype(np.float32))}
    return seqs, ctr


def _keep_best(model: nn.Module, optim, sched, out_dir: str, rank: int, part: str) -> Callable[[dict, bool], None]:
    """`loop.fit`'s on_validated for a teacher part: rank 0 saves the weights of each new best
    validation, and every rank reports the epoch to Ray Train with its checkpoint, which names the
    part (several parts train one after another in one Train run)."""
    def on_validated(st: dict, improved: bool) -> None:
        if rank == 0 and improved:
            save_weights(model, PartDir(out_dir).weights)
        trainstate.report_epoch(model, optim, sched, {**st, "part": part},
                                {"epoch": st["epoch"], "valid_score": st["best"]}, rank)
    return on_validated


def teacher_loop(config: dict) -> None:
    """Ray Train worker function: the sequence models of `config["parts"]` (the SASRec baselines and
    the teacher's members), then the text classifier of each task in `config["text"]`, one after
    another. A model whose history is written is skipped, so a restarted run goes on with the one it
    was training, from that model's last checkpoint."""
    cfg = RunConfig.model_validate(config["cfg"])
    set_threads(cfg.teacher.cpus_per_worker)
    if config["parts"]:
        tasks = sorted({t for part in config["parts"] for t in part["tasks"]})
        longest = max(SeqSpec.from_json(part["spec"]).max_history for part in config["parts"])
        seqs, ctr = _sequence_shards(tasks, longest + 1, cfg.tasks.ctr.max_history)
        for part in config["parts"]:
            # every rank reads the same folders, and the ranks go through a part's epochs in step
            # (each epoch ends with a `ray.train.report` from every rank), so they skip alike
            if not storage.exists(PartDir(part["out_dir"]).history):
                _train_part(cfg, config, part, seqs, ctr)
    for task, part in config["text"].items():
        if not storage.exists(PartDir(part["out_dir"]).history):
            _train_text(cfg, config, task)


def _train_part(cfg: RunConfig, config: dict, part: dict, all_seqs: torch.Tensor | None, ctr: dict | None) -> None:
    """Train one sequence model with `loop.fit` until validation stops improving; rank 0 writes its
    best weights and its history into the part's folder."""
    import ray.train
    import ray.train.torch

    sc, name, out_dir, prepare_dir = cfg.teacher.sequence, part["name"], part["out_dir"], config["prepare_dir"]
    spec = SeqSpec.from_json(part["spec"])
    tasks = part["tasks"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(loop.epoch_seed(part["seed"], 0, 0, stream=1))  # same initial weights on every rank
    item_text = load_weights(config["item_text"])["item_text"] if spec.text_dim else None
    member = build_member(spec, config["teacher_spec"], item_text, ctr_head=part["ctr_head"] and "ctr" in tasks)
    seqs = None if all_seqs is None or "recommendation" not in tasks else all_seqs[:, -(spec.max_history + 1):]
    ctr = ctr if "ctr" in tasks else None
    sampled = spec.n_items - 2 > sc.sampled_softmax_above
    proposal = torch.tensor(config["popularity"], dtype=torch.float32) if sampled else None
    weights = {t: getattr(cfg.tasks, t).weight for t in tasks}
    loss_mod = MemberLoss(member, NextItemLoss(sc.negatives if sampled else 0, proposal), weights,
                          sc.ctr_trains_encoder or "recommendation" not in tasks)  # CTR alone: it must
    member.to(device)  # before the optimizer: a restored optimizer state follows its parameters' device
    loss_mod.to(device)
    optim = torch.optim.AdamW(member.parameters(), lr=sc.lr, weight_decay=sc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 1.0)
    state = trainstate.restore(member, optim, sched, part=name)
    if state and rank == 0:
        say(f"[teacher] {name}: resuming after epoch {state['epoch']} from the last checkpoint")
    model = ray.train.torch.prepare_model(loss_mod, parallel_strategy_kwargs={"find_unused_parameters": True}) \
        if world > 1 else loss_mod
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    score_task = "recommendation" if "recommendation" in tasks else "ctr"

    def validate():
        valid = evaluate_member(member, prepare_dir, "valid", tasks, spec.n_items, spec.max_history, cfg.seed, device)
        return valid[score_task][SCORE_METRIC[score_task]], valid

    def log(epoch: int, entry: dict, improved: bool) -> None:
        if rank == 0:
            v = entry["valid"]
            line = "  ".join(f"{t}:{SCORE_METRIC[t]}={v[t][SCORE_METRIC[t]]:.4f}" for t in SEQ_TASKS if t in v)
            say(f"[teacher] {name} epoch {epoch + 1}/{sc.epochs}  loss={entry['loss'].get('total', 0):.4f}  {line}"
                f"{'  *best' if improved else ''}  ({sc.eval_every} epochs, {entry['seconds']}s)")

    plan = loop.Plan(epochs=sc.epochs, patience=sc.patience, eval_every=sc.eval_every, clip=5.0,
                     seed=part["seed"], rank=rank)
    per_target = sc.weighting == "target"
    state = loop.fit(model, optim, sched, plan,
                     batches=lambda gen: sequence_batches(seqs, ctr, config["steps"], sc.ctr_batch_size, gen, device,
                                                          per_target),
                     loss=model, validate=validate, on_validated=_keep_best(member, optim, sched, out_dir, rank, name),
                     state=state, autocast=autocast, log=log)
    if rank == 0:
        storage.write_json(PartDir(out_dir).history, state["history"])


# ------------------------------------------------------------------------------ 4. text classes
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


class ClassifierLoss(nn.Module):
    """Cross entropy of a text classifier: forward(batch) -> {task: loss, "total": loss}."""

    def __init__(self, model: TextTeacher, task: str):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "bag_ids", "bag_offsets") if k in batch}
        loss = F.cross_entropy(self.model(**inputs), batch["label"])
        return {self.task: loss, "total": loss}


def _text_optimizer(model: TextTeacher, tc) -> torch.optim.AdamW:
    """AdamW with the encoder, the head and the lexical bag each at its own rate."""
    groups = [{"params": list(model.backbone.parameters()), "lr": tc.lr},
              {"params": list(model.head.parameters()), "lr": tc.head_lr}]
    if model.lexical is not None:  # its rare n-gram rows see few updates: a rate of their own, no decay
        groups.append({"params": list(model.lexical.parameters()), "lr": tc.lexical_lr, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, weight_decay=tc.weight_decay, fused=True)  # one kernel, not a loop over tensors


def _text_batches(df: pd.DataFrame, tokenizer, tc, steps: int, device) -> Callable:
    """An epoch for `loop.fit`: `steps` batches of `tc.intent_batch_size` texts bucketed by length
    (sorted with jitter, cut, taken in random order): each pads to its longest text, and titles range
    from a few tokens to max_length. A shard shorter than the others repeats texts."""
    lengths = df["text"].str.len().to_numpy(float) if len(df) else np.zeros(0)
    buckets = tc.lexical_buckets if tc.lexical_dim else 0

    def batches(gen: torch.Generator):
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
    return batches


def _train_text(cfg: RunConfig, config: dict, task: str) -> None:
    """Fine-tune an encoder and its lexical bag on `task`'s texts (`loop.fit`); rank 0 writes its
    best weights and its history into `config["text"][task]["out_dir"]`."""
    import ray.train
    import ray.train.torch

    tc, out_dir, prepare_dir = cfg.teacher, config["text"][task]["out_dir"], config["prepare_dir"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(loop.epoch_seed(cfg.seed, 0, 0, stream=1))
    backbone, tokenizer = load_backbone(tc.model)
    n_classes = len(config["teacher_spec"].classes[task])
    model = TextTeacher(backbone, n_classes, tc.lexical_dim, tc.lexical_buckets).to(device)
    optim = _text_optimizer(model, tc)
    steps = config["text"][task]["steps"]
    sched = trainstate.warmup_linear(optim, steps * tc.epochs, tc.warmup_ratio)
    state = trainstate.restore(model, optim, sched, part=task)
    if state and rank == 0:
        say(f"[teacher] {task}: resuming after epoch {state['epoch']} from the last checkpoint")
    loss_mod = ClassifierLoss(model, task)
    ddp = ray.train.torch.prepare_model(loss_mod, parallel_strategy_kwargs={"find_unused_parameters": True}) \
        if world > 1 else loss_mod
    parts = list(ray.train.get_dataset_shard(task).iter_batches(batch_size=None, batch_format="pandas"))
    df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({"text": [], "label": []})
    buckets = tc.lexical_buckets if tc.lexical_dim else 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    batches = _text_batches(df, tokenizer, tc, steps, device)
    metric = TASKS[task].score_metric

    def validate():
        def text_logits(_, texts):
            return model(**text_inputs(tokenizer, texts, max_length=tc.max_length, buckets=buckets, device=device))
        valid = evaluation.evaluate(evaluation.predictors(model, [task], text_logits, device), prepare_dir, "valid",
                                    n_items=0, max_history=1, seed=cfg.seed)
        return valid[task][metric], valid

    def log(epoch: int, entry: dict, improved: bool) -> None:
        if rank == 0:
            v = entry["valid"][task]
            say(f"[teacher] {task} epoch {epoch + 1}/{tc.epochs}  loss={entry['loss'].get('total', 0):.4f}  "
                + "  ".join(f"{m}={v[m]:.4f}" for m in TASKS[task].metrics)
                + f"{'  *best' if improved else ''}  ({entry['seconds']}s)")

    plan = loop.Plan(epochs=tc.epochs, patience=tc.patience, eval_every=1, clip=1.0, seed=cfg.seed, rank=rank)
    state = loop.fit(ddp, optim, sched, plan, batches=batches, loss=ddp, validate=validate,
                     on_validated=_keep_best(model, optim, sched, out_dir, rank, task), state=state,
                     autocast=autocast, log=log)
    if rank == 0:
        storage.write_json(PartDir(out_dir).history, state["history"])


# ------------------------------------------------------------------------------ the stage
def _finished(name: str, out_dir: str) -> bool:
    if storage.exists(PartDir(out_dir).history):
        say(f"[teacher] {name}: already trained, kept")
        return True
    return False


def _fit(cfg: RunConfig, datasets: dict, loop_config: dict, name: str) -> None:
    """One of the stage's Ray Train runs (`teacher_loop`), resumed when its folder holds a checkpoint
    of an interrupted attempt."""
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as TrainRunConfig
    from ray.train.torch import TorchTrainer

    layout = RunLayout(cfg.run_dir)
    trainer = TorchTrainer(
        teacher_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "prepare_dir": layout.prepare.root, **loop_config},
        datasets=datasets,
        scaling_config=ScalingConfig(num_workers=cfg.teacher.num_workers, use_gpu=cfg.teacher.use_gpu,
                                     resources_per_worker={"CPU": cfg.teacher.cpus_per_worker}),
        run_config=TrainRunConfig(name=name, storage_path=layout.teacher.ray_train,
                                  failure_config=FailureConfig(max_failures=cfg.teacher.max_failures),
                                  checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    result = trainer.fit()
    if result.error:
        raise result.error


def _popularity(prepare_dir: str, n_items: int) -> list[float]:
    """Click counts + 1 per item id (the sampled softmax's proposal)."""
    counts = np.ones(n_items)
    items = read_items(prepare_dir)
    counts[2:] += items["clicks"].fillna(0).to_numpy(float) if "clicks" in items else 0
    return counts.tolist()


def train_models(cfg: RunConfig, out_dir: str, text: torch.Tensor | None, tspec: TeacherSpec) -> dict:
    """Steps 2-4: the SASRec baseline grid, the teacher's grid (one seed per width and dropout) and
    the text classifiers in one Ray Train run; then, with `members` > 1, the other seeds of each width
    at the dropout its grid chose, in a second. Every model is kept when it finished before.
    Returns {"teacher": [...], "sasrec": [...]}, one {name, dir, spec, seed_index, valid, score,
    best_epoch, epochs_run} per trained sequence model."""
    out_dir = TeacherDir(out_dir)
    tasks = [t for t in cfg.tasks.enabled() if t in SEQ_TASKS]
    text_dim = 0 if text is None else text.shape[1]
    sasrec, grid, parts = _sequence_parts(cfg, out_dir, tasks, tspec, text_dim)
    _train(cfg, out_dir, tasks, tspec, parts, text=True, name="teacher")
    done = {"teacher": _trained(grid), "sasrec": _trained(sasrec)}
    if cfg.teacher.sequence.members > 1 and grid:
        seeds, parts = _seed_parts(cfg, out_dir, tasks, tspec.n_items, text_dim, choose_dropouts(done["teacher"]))
        _train(cfg, out_dir, tasks, tspec, parts, text=False, name="teacher-seeds")
        done["teacher"] += _trained(seeds)
    return done


def _trained(rows: list[dict]) -> list[dict]:
    """Grid entries with their best validation (`_best` of each written history)."""
    return [{**r, **_best(storage.read_json(PartDir(r["dir"]).history))} for r in rows]


def _train(cfg: RunConfig, out_dir: TeacherDir, tasks: list[str], tspec: TeacherSpec, parts: list[dict], *,
           text: bool, name: str) -> None:
    """One Ray Train run (`name`) of the `parts` not finished yet, and, with `text`, of the text
    classifiers not finished either."""
    import ray

    prepare_dir = RunLayout(cfg.run_dir).prepare.root
    todo = [part for part in parts if not _finished(part["name"], part["out_dir"])]
    datasets, steps = {}, 1
    if todo and "recommendation" in tasks:
        users = user_sequences(read_split(prepare_dir, "recommendation", "train"))
        datasets["sequences"] = ray.data.from_arrow(users).materialize()
        steps = max(1, math.ceil(users.num_rows / cfg.teacher.num_workers / cfg.teacher.sequence.batch_size))
    if todo and "ctr" in tasks:
        datasets["ctr"] = read_parquet(PrepareDir(prepare_dir).examples("ctr", "train")).materialize()
        if "recommendation" not in tasks:
            steps = max(1, math.ceil(datasets["ctr"].count() / cfg.teacher.num_workers
                                     / cfg.teacher.sequence.ctr_batch_size))
    text_parts = {}
    for task in (tspec.classes if text else ()):
        if not _finished(task, out_dir.classifier(task).root):
            datasets[task] = read_parquet(PrepareDir(prepare_dir).examples(task, "train")).materialize()
            text_parts[task] = {"out_dir": out_dir.classifier(task).root,
                                "steps": max(1, math.ceil(datasets[task].count() / cfg.teacher.num_workers
                                                          / cfg.teacher.intent_batch_size))}
    if todo or text_parts:
        _fit(cfg, datasets,
             {"teacher_spec": tspec, "steps": steps, "popularity": _popularity(prepare_dir, tspec.n_items),
              "item_text": out_dir.item_text, "parts": todo, "text": text_parts}, name)


def _member(cfg: RunConfig, out_dir: TeacherDir, tasks: list[str], n_items: int, text_dim: int, dim: int,
            p: float, k: int) -> tuple[dict, dict]:
    """(the teacher grid's entry, the `teacher_loop` part) of the member of width `dim`, dropout `p`
    and seed index `k`."""
    sc = cfg.teacher.sequence
    spec = seq_spec(cfg, n_items, text_dim, dim=dim, dropout=p)
    name = member_name(dim, p, k, sc.members)
    row = {"name": name, "dir": out_dir.member(name).root, "spec": spec.to_json(), "seed_index": k}
    return row, {"name": name, "out_dir": row["dir"], "spec": spec.to_json(), "tasks": tasks, "ctr_head": True,
                 "seed": cfg.seed + 1000 * k}


def _sequence_parts(cfg: RunConfig, out_dir: TeacherDir, tasks: list[str], tspec: TeacherSpec,
                    text_dim: int) -> tuple[list[dict], list[dict], list[dict]]:
    """(the SASRec grid's entries, the teacher grid's entries (seed index 0), every sequence model
    of the first Train run as a `teacher_loop` part)."""
    sasrec, grid, parts = [], [], []
    if "recommendation" in tasks and cfg.teacher.sasrec.enabled:
        for dim in cfg.teacher.sasrec.dims:
            for p in cfg.teacher.sasrec.dropouts:
                spec = seq_spec(cfg, tspec.n_items, text_dim, dim=dim, dropout=p, item_text=False)
                name = f"sasrec-d{dim}-p{p:g}"
                sasrec.append({"name": name, "dir": out_dir.sasrec(name).root, "spec": spec.to_json()})
                parts.append({"name": name, "out_dir": sasrec[-1]["dir"], "spec": spec.to_json(),
                              "tasks": ["recommendation"], "ctr_head": False, "seed": cfg.seed})
    if tasks:
        for dim in cfg.teacher.sequence.dims:
            for p in cfg.teacher.sequence.dropouts:
                row, part = _member(cfg, out_dir, tasks, tspec.n_items, text_dim, dim, p, 0)
                grid.append(row)
                parts.append(part)
    return sasrec, grid, parts


def _seed_parts(cfg: RunConfig, out_dir: TeacherDir, tasks: list[str], n_items: int, text_dim: int,
                dropouts: dict[int, float]) -> tuple[list[dict], list[dict]]:
    """(grid entries, parts) of seed indices 1 .. members-1 of each width at its chosen dropout."""
    rows = [_member(cfg, out_dir, tasks, n_items, text_dim, dim, p, k) for dim, p in dropouts.items()
            for k in range(1, cfg.teacher.sequence.members)]
    return [r for r, _ in rows], [part for _, part in rows]


def choose_dropouts(grid: list[dict]) -> dict[int, float]:
    """{width: the dropout whose first seed (seed_index 0) has the best validation `score`}: the
    grid trains every (width, dropout) once; the other seeds train only at the chosen dropout."""
    best: dict[int, dict] = {}
    for r in grid:
        if r.get("seed_index", 0) == 0 and (r["spec"]["dim"] not in best or r["score"] > best[r["spec"]["dim"]]["score"]):
            best[r["spec"]["dim"]] = r
    return {dim: r["spec"]["dropout"] for dim, r in best.items()}


def choose_members(grid: list[dict]) -> list[dict]:
    """The teacher's ensemble out of its trained grid (`train_models`' "teacher" rows): per width,
    every seed at the dropout `choose_dropouts` picks, in width then seed order."""
    dropouts = choose_dropouts(grid)
    chosen = [r for r in grid if dropouts.get(r["spec"]["dim"]) == r["spec"]["dropout"]]
    return sorted(chosen, key=lambda r: (list(dropouts).index(r["spec"]["dim"]), r.get("seed_index", 0)))


def sasrec_test(teacher_dir: str, metrics: dict, prepare_dir: str, tasks, tspec: TeacherSpec, seed: int) -> dict:
    """{task: test metrics} of the SASRec baseline that `metrics` (a teacher metrics.json) chose,
    loaded from `teacher_dir`/sasrec/<name>; its CTR score is its recommendation score."""
    chosen = metrics.get("sasrec_chosen")
    if not chosen:
        return {}
    spec = SeqSpec.from_json(next(r["spec"] for r in metrics["sasrec_grid"] if r["name"] == chosen))
    model = build_member(spec, tspec, ctr_head=False)
    model.load_state_dict(load_weights(TeacherDir(teacher_dir).sasrec(chosen).weights))
    sas_tasks = [t for t in SEQ_TASKS if t in tasks]
    return evaluate_member(model, prepare_dir, "test", sas_tasks, tspec.n_items, spec.max_history, seed)


def _best(history: list[dict]) -> dict:
    best = max(history, key=lambda h: h["score"])
    return {"valid": best["valid"], "score": best["score"], "best_epoch": best["epoch"] + 1,
            "epochs_run": history[-1]["epoch"] + 1}


def run(cfg: RunConfig, out_dir: str) -> dict:
    out = TeacherDir(out_dir)
    prepare_dir = RunLayout(cfg.run_dir).prepare.root
    tasks = cfg.tasks.enabled()
    backbone, tokenizer = load_backbone(cfg.teacher.model)  # fail here, with the path, not inside a worker
    hidden = backbone.config.hidden_size
    seq_tasks = [t for t in tasks if t in SEQ_TASKS]
    uses_text = bool(seq_tasks) and cfg.teacher.sequence.item_text
    text = item_text_embeddings(cfg, out_dir) if uses_text else None
    tspec = teacher_spec(cfg, prepare_dir, hidden if uses_text else 0)
    trained = train_models(cfg, out_dir, text, tspec)
    members = choose_members(trained["teacher"])
    tspec = dataclasses.replace(tspec, sequences=tuple(SeqSpec.from_json(r["spec"]) for r in members))

    # assemble the teacher from its trained parts
    model = build(backbone, tspec, text, ctr_head="ctr" in tasks)
    state = model.state_dict()
    for task in tspec.classes:
        state.update({f"classifiers.{task}.{k}": v for k, v in load_weights(out.classifier(task).weights).items()})
    for i, r in enumerate(members):
        state.update({f"members.{i}.{k}": v for k, v in load_weights(PartDir(r["dir"]).weights).items()})
    model.load_state_dict(state)
    model.eval()
    save_model(model, tokenizer, tspec, out.model)

    valid = evaluate(model, tokenizer, prepare_dir, "valid", tasks, cfg.teacher.max_length, seed=cfg.seed)
    test = evaluate(model, tokenizer, prepare_dir, "test", tasks, cfg.teacher.max_length, seed=cfg.seed)
    base = baselines(prepare_dir, tasks, "test", cfg.seed)
    keys = ("name", "spec", "valid", "best_epoch", "epochs_run")
    report = {"valid": valid, "test": test, "baselines": base, "sasrec_grid": [],
              "teacher_grid": [{k: r[k] for k in keys} for r in trained["teacher"]],
              "teacher_members": [r["name"] for r in members]}
    if trained["sasrec"]:
        chosen = max(trained["sasrec"], key=lambda r: r["valid"]["recommendation"]["ndcg@10"])
        report["sasrec_grid"] = [{k: r[k] for k in keys} for r in trained["sasrec"]]
        report["sasrec_chosen"] = chosen["name"]
        for t, m in sasrec_test(out_dir, report, prepare_dir, tasks, tspec, cfg.seed).items():
            base.setdefault(t, {})["sasrec"] = m
    if tspec.classes:
        report["text_epochs"] = {t: _best(storage.read_json(out.classifier(t).history)) for t in tspec.classes}
    if len(model.members) > 1:  # what the ensemble buys: each member alone on the same test split
        report["members_test"] = [evaluate_member(m, prepare_dir, "test", [t for t in SEQ_TASKS if t in tasks],
                                                  tspec.n_items, tspec.max_history, cfg.seed)
                                  for m in model.members]
    storage.write_json(out.metrics, report)
    print_metrics(report)
    storage.remove(out.ray_train)  # checkpoints only matter while the stage is unfinished
    return {"counts": {"params": sum(p.numel() for p in model.parameters()),
                       "sequence_params": sum(p.numel() for p in model.members.parameters())},
            "sasrec": report.get("sasrec_chosen"), "valid_mean_metric": mean_metric(valid), "test": test}


def reuse(cfg: RunConfig, out_dir: str) -> dict:
    """The teacher stage of a warm-started run: the earlier teacher, copied, evaluated on this window."""
    src = warmstart.source(cfg)
    out, layout = TeacherDir(out_dir), RunLayout(cfg.run_dir)
    model_dir = out.model
    say(f"[teacher] warm start: reusing the fine-tuned teacher of {src.run_dir} (no training)")
    storage.copy_dir(src.teacher_dir, model_dir)
    model, tokenizer, spec = load_model(model_dir)
    prepare_dir = layout.prepare.root
    tasks = [t for t in cfg.tasks.enabled() if t in spec.tasks]
    for task, labels in spec.classes.items():
        new_labels = TASKS[task].labels(prepare_dir)
        if task in tasks and new_labels != labels:
            raise StageError(f"the teacher of {src.run_dir} has {task} classes {list(labels)}, the new window "
                             f"{list(new_labels)}: prepare keeps the earlier classes under warm start; re-run it (--force)")
    valid = evaluate(model, tokenizer, prepare_dir, "valid", tasks, cfg.teacher.max_length, seed=cfg.seed)
    test = evaluate(model, tokenizer, prepare_dir, "test", tasks, cfg.teacher.max_length, seed=cfg.seed)
    report = {"valid": valid, "test": test, "baselines": baselines(prepare_dir, tasks, "test", cfg.seed),
              "reused_from": src.run_dir}
    # the earlier run's SASRec baseline, like its teacher, measured on this window
    earlier_dir = src.layout.teacher
    earlier = storage.read_json(earlier_dir.metrics)
    if earlier.get("sasrec_chosen"):
        # copied with its teacher, so that a run warm-started from this one finds it too
        chosen = earlier["sasrec_chosen"]
        storage.copy_dir(earlier_dir.sasrec(chosen).root, out.sasrec(chosen).root)
        for t, m in sasrec_test(out_dir, earlier, prepare_dir, tasks, spec, cfg.seed).items():
            report["baselines"].setdefault(t, {})["sasrec"] = m
        report.update(sasrec_chosen=earlier["sasrec_chosen"], sasrec_grid=earlier["sasrec_grid"])
    storage.write_json(out.metrics, report)
    print_metrics(report)
    return {"counts": {"params": sum(p.numel() for p in model.parameters())}, "reused_from": src.run_dir,
            "valid_mean_metric": mean_metric(valid), "test": test,
            "model_sha256": storage.sha256(storage.join(model_dir, "model.safetensors"))}


def print_metrics(report: dict) -> None:
    print("[teacher] test metrics (teacher vs baselines):")
    for task, metric in SCORE_METRIC.items():
        if task in report["test"]:
            others = "  ".join(f"{name}={m[metric]:.4f}" for name, m in report["baselines"].get(task, {}).items())
            print(f"  {task:<15} {metric:<9} teacher={report['test'][task][metric]:.4f}  {others}")
    for i, m in enumerate(report.get("members_test", [])):
        print(f"  member {i} alone: " + "  ".join(f"{t} {SCORE_METRIC[t]}={v[SCORE_METRIC[t]]:.4f}" for t, v in m.items()))
    def grid(rows: list[dict]) -> str:
        return ", ".join(f"{r['name']} {_valid_score(r):.4f} (epoch {r['best_epoch']})" for r in rows)

    if report.get("teacher_grid"):
        print(f"[teacher] sequence teacher: members {', '.join(report['teacher_members'])}, the seeds of the "
              f"dropout best on validation per width (grid: {grid(report['teacher_grid'])})")
    if report.get("sasrec_grid"):
        print(f"[teacher] SASRec baseline chosen on validation NDCG@10: {report['sasrec_chosen']} "
              f"(grid: {grid(report['sasrec_grid'])})")


def _valid_score(row: dict) -> float:
    """A grid row's validation score: NDCG@10, or CTR AUC in a run without recommendation."""
    task = "recommendation" if "recommendation" in row["valid"] else "ctr"
    return row["valid"][task][SCORE_METRIC[task]]
