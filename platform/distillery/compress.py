"""The `compress` stage: prune and 8-bit-quantize the winning student, keep the smallest variant that
stays within `compress.max_relative_drop` of it on every task, and write the bundle.

The winner is the tune stage's best student when that stage ran, else the distill stage's.
Variants, each evaluated on the validation split:
- `student`: the winner as it is (float32);
- `student_int8`: its 2-D weights stored 8-bit row-wise (`quant.py`);
- `student_prunedNN`: global magnitude pruning of NN% of all 2-D weights (embeddings and Linear
  layers ranked together), then `compress.finetune_steps` steps of the same distillation loss with
  the pruned weights held at zero;
- `student_prunedNN_int8`: that, 8-bit.
The kept variant is the smallest file among those within budget (ties: the smaller drop). Pruned
weights are stored densely (safetensors has no sparse layout), so pruning alone shrinks nothing on
disk; it is tried because 8-bit codes of a pruned model lose less when rows are mostly zero.

Outputs: RUN_DIR/compress/variants.json (every variant: size, non-zero weights, validation metrics,
drops), RUN_DIR/compress/metrics.json (the kept variant's validation and test metrics), and
RUN_DIR/bundle/ (`bundle.py`).
"""
from __future__ import annotations

import math

import torch

from . import bundle, distill, evaluation, quant, storage, trainstate
from . import student as S
from .config import RunConfig
from .progress import say
from .teacher import SCORE_METRIC


def prune_masks(model: torch.nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """{parameter name: 0/1 mask} zeroing the `sparsity` fraction of smallest-magnitude entries
    over all 2-D float parameters together (global magnitude pruning)."""
    params = {n: p for n, p in model.named_parameters() if p.ndim == 2}
    flat = torch.cat([p.detach().abs().flatten() for p in params.values()])
    k = int(sparsity * flat.numel())
    if k < 1:
        return {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()}
    threshold = flat.kthvalue(k).values
    return {n: p.detach().abs() > threshold for n, p in params.items()}


def apply_masks(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in masks:
                p.mul_(masks[n])


def finetune(model, loss_cfg: RunConfig, tasks: list[str], data: dict, shares: dict, steps: int,
             masks: dict[str, torch.Tensor], seed: int) -> float:
    """`steps` steps of the distillation loss, pruned weights put back to zero after each; returns
    the mean loss of the last 10 steps."""
    loss_fn = distill.DistillLoss(model, loss_cfg, tasks, kd=True)
    optim = torch.optim.AdamW(model.parameters(), lr=loss_cfg.distill.lr * 0.3, weight_decay=0.0)
    sched = trainstate.warmup_linear(optim, max(steps, 1), 0.0)
    gen = torch.Generator().manual_seed(seed)
    sizes = {t: (len(v["bag_offsets"]) - 1 if "bag_offsets" in v else len(next(iter(v.values())))) for t, v in data.items()}
    model.train()
    tail = []
    for _ in range(steps):
        batches = {t: distill._select(data[t], torch.randint(sizes[t], (shares[t],), generator=gen), "cpu")
                   for t in tasks if sizes[t]}
        loss = loss_fn(batches)["total"]
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
        apply_masks(model, masks)
        tail = (tail + [float(loss.detach())])[-10:]
    model.eval()
    return sum(tail) / len(tail) if tail else float("nan")


def _bytes(state: dict[str, torch.Tensor]) -> int:
    from safetensors.torch import save

    return len(save({k: v.detach().contiguous().cpu() for k, v in state.items()}))


def relative_drops(valid: dict, base: dict) -> dict[str, float]:
    """Per task, (base - variant) / base of the task's score metric (negative = better)."""
    return {t: (base[t][m] - valid[t][m]) / base[t][m] for t, m in SCORE_METRIC.items()
            if t in base and t in valid and base[t][m]}


def choose(variants: list[dict], max_drop: float) -> dict:
    """The smallest variant within `max_drop` on every task (ties: the smaller worst drop)."""
    ok = [v for v in variants if v["within_budget"]]
    return min(ok, key=lambda v: (v["bytes"], max(v["drops"].values(), default=0.0)))


def _work(cfg: RunConfig, loss_cfg: RunConfig, inp: distill.Inputs, model_dir: str, threads: int) -> dict:
    """The stage's compute, run as one Ray task: every variant built and evaluated."""
    torch.set_num_threads(threads)
    base, tok, meta = S.load(model_dir)
    cc = cfg.compress
    evaluate = lambda m: evaluation.evaluate(S.predictors(m, tok, meta, inp.tasks), inp.prepare_dir, "valid",  # noqa: E731
                                             n_items=meta["n_items"], max_history=meta["max_history"], seed=cfg.seed)
    data = {t: distill.TASKS[t].tensors(tb, meta) for t, tb in inp.tables.items()}
    fp32 = {k: v.clone() for k, v in base.state_dict().items()}
    candidates = [("student", 0.0, fp32)]
    for s in cc.sparsities:
        model = S.load(model_dir)[0]
        masks = prune_masks(model, s)
        apply_masks(model, masks)
        loss = finetune(model, loss_cfg, inp.tasks, data, inp.shares, cc.finetune_steps, masks, cfg.seed)
        say(f"[compress] pruned {s:.0%} of the weights, fine-tuned {cc.finetune_steps} steps (loss {loss:.4f})")
        candidates.append((f"student_pruned{round(s * 100)}", s, {k: v.clone() for k, v in model.state_dict().items()}))
    if cc.int8:
        candidates += [(f"{name}_int8", s, quant.quantize_state(st)) for name, s, st in list(candidates)]

    variants, base_valid = [], None
    for name, sparsity, state in candidates:
        model = S.load(model_dir)[0]
        model.load_state_dict(quant.dequantize_state(state))
        valid = evaluate(model.eval())
        base_valid = base_valid or valid
        drops = relative_drops(valid, base_valid)
        nonzero = sum(int((p != 0).sum()) for n, p in model.named_parameters() if p.ndim == 2)
        variants.append({"name": name, "sparsity": sparsity, "int8": quant.is_quantized(state), "bytes": _bytes(state),
                         "nonzero_2d_weights": nonzero, "valid": valid, "drops": drops,
                         "within_budget": all(d <= cc.max_relative_drop for d in drops.values())})
        # no relative drop where the uncompressed score is 0 (an untrained or degenerate task)
        line = "  ".join(f"{t}={valid[t][m]:.4f}" + (f" ({-drops[t]:+.2%})" if t in drops else "")
                         for t, m in SCORE_METRIC.items() if t in valid)
        say(f"[compress] {name:<24} {variants[-1]['bytes'] / 1e6:6.2f} MB  {line}"
            f"{'' if variants[-1]['within_budget'] else '  (over budget)'}")
    chosen = choose(variants, cc.max_relative_drop)
    state = dict(next(st for name, _, st in candidates if name == chosen["name"]))
    model = S.load(model_dir)[0]
    model.load_state_dict(quant.dequantize_state(state))
    test = evaluation.evaluate(S.predictors(model.eval(), tok, meta, inp.tasks), inp.prepare_dir, "test",
                               n_items=meta["n_items"], max_history=meta["max_history"], seed=cfg.seed)
    return {"variants": variants, "chosen": chosen, "state": state, "test": test}


def run(cfg: RunConfig, out_dir: str) -> dict:
    import pyarrow.parquet as pq
    import ray

    from . import tune

    model, tok, meta, model_dir = tune.load_winner(cfg.run_dir)
    tuned = storage.join(cfg.run_dir, "tune", "best.json")
    loss_cfg, source = cfg, "distill"
    if "/tune/" in model_dir.replace("\\", "/") and storage.exists(tuned):
        best = storage.read_json(tuned)
        loss_cfg, source = tune.trial_config(cfg, best["params"]), f"tune (trial {best['trial_id']})"
    say(f"[compress] compressing the student from {source}: {model_dir}")
    inp = distill.inputs(loss_cfg)
    threads = max(1, math.floor(cfg.compress.cpus))
    work = ray.remote(num_cpus=cfg.compress.cpus)(_work)
    out = ray.get(work.remote(cfg, loss_cfg, inp, model_dir, threads))
    chosen = out["chosen"]
    storage.write_json(storage.join(out_dir, "variants.json"), out["variants"])
    teacher_metrics = storage.read_json(storage.join(cfg.run_dir, "teacher", "metrics.json"))
    metrics = {"variant": chosen["name"], "source": source, "valid": chosen["valid"], "test": out["test"],
               "drops": chosen["drops"], "teacher": {"valid": teacher_metrics["valid"], "test": teacher_metrics["test"]}}
    storage.write_json(storage.join(out_dir, "metrics.json"), metrics)

    fs, path = storage.resolve(storage.join(cfg.run_dir, "prepare", "items.parquet"))
    items = pq.read_table(path, filesystem=fs, columns=["idx", "item_id", "title", "category", "category_idx", "clicks"])
    config = {**meta, "weights": "int8-rowwise" if chosen["int8"] else "float32", "sparsity": chosen["sparsity"],
              "variant": chosen["name"], "source": source, "run_dir": cfg.run_dir}
    manifest = bundle.write(storage.join(cfg.run_dir, "bundle"), state=out["state"], config=config, tokenizer=tok,
                            items=items, metrics=metrics)
    base = out["variants"][0]
    say(f"[compress] kept {chosen['name']}: {chosen['bytes'] / 1e6:.2f} MB against {base['bytes'] / 1e6:.2f} MB "
        f"({base['bytes'] / chosen['bytes']:.1f}x smaller); bundle in {storage.join(cfg.run_dir, 'bundle')} "
        f"({len(manifest['files'])} files, verified by `distillery verify`)")
    return {"chosen": chosen["name"], "bytes": chosen["bytes"], "fp32_bytes": base["bytes"],
            "drops": chosen["drops"], "variants": {v["name"]: {"bytes": v["bytes"], "within_budget": v["within_budget"]}
                                                   for v in out["variants"]}}


__all__ = ["run", "prune_masks", "apply_masks", "finetune", "relative_drops", "choose"]
