"""The `compress` stage: variants of the winning student, each smaller or faster than the one it is
made from, measured side by side; the smallest within every task's budget is bundled.

The winner is the tune stage's best student when that stage ran, else the distill stage's.
Variants (`shrink.py` does the surgery), each evaluated on the validation split:
- `student`: the winner as it is (float32, item text bags as int64 token ids);
- `student_compact`: the text table cut to the rows the catalogue and the training texts use
  (`compress.vocab_min_count`, `vocab_reserve`), the item text folded into the item rows (no
  bags), integer buffers in the narrowest type. No training: exact wherever a text's pieces were kept;
- `student_unitsNN` (from compact): NN% of the MLPs' hidden units and of the text table's columns
  kept, then `compress.finetune_steps` steps of the same distillation loss;
- `..._int8` of each: 2-D weights stored 8-bit row-wise (`quant.py`). Served dequantized: the
  4x smaller file is what it buys, not speed (torch's int8 kernels measured slower at these widths).

Every variant's size, parameters, batch-1 p50 and batch-256 throughput (`latency.measure_latency`,
interleaved in one run) and its change on each task (validation, which the choice reads, and test,
reported only) are in RUN_DIR/compress/variants.json, with its parent and whether it is smaller or
faster than that parent. Unstructured magnitude pruning was
removed: zeroed weights stored and multiplied densely shrank nothing.

Outputs: variants.json, RUN_DIR/compress/metrics.json (the kept variant's validation and test
metrics) and RUN_DIR/bundle/ (`bundle.py`).
"""
from __future__ import annotations

import math

import torch

from .. import evaluation, latency, loop, quant, shrink, storage, trainstate
from ..config import RunConfig, with_trial
from ..layout import CompressDir, RunLayout
from ..models import student as S
from ..models.student import StudentSpec
from ..progress import say
from ..tasks import SCORE_METRIC, TASKS
from ..serving import bundle
from . import distill


def finetune(model, loss_cfg: RunConfig, tasks: list[str], data: dict, shares: dict, steps: int, seed: int,
             loss_context: dict | None = None) -> float:
    """`steps` steps of the distillation loss through the shared loop (`loop.fit`, one epoch, no
    early stopping: the variant is measured afterwards); returns the mean loss over the steps.
    loss_context: as `distill.DistillLoss`'s."""
    loss_fn = distill.DistillLoss(model, loss_cfg, tasks, kd=True, loss_context=loss_context)
    optim = torch.optim.AdamW(model.parameters(), lr=loss_cfg.distill.lr * 0.3, weight_decay=0.0)
    sched = trainstate.warmup_linear(optim, max(steps, 1), 0.0)
    batches = distill.mixed_batches({t: data[t] for t in tasks}, shares, steps, "cpu")
    plan = loop.Plan(epochs=1, patience=1, clip=1.0, clip_per_group=False, seed=seed)
    state = loop.fit(model, optim, sched, plan, batches=batches, loss=loss_fn, validate=lambda: (0.0, {}),
                     on_validated=lambda state, improved: None)
    return state["history"][-1]["loss"].get("total", float("nan"))  # NaN for 0 steps: no loss was taken


def _bytes(state: dict[str, torch.Tensor]) -> int:
    from safetensors.torch import save

    return len(save({k: v.detach().contiguous().cpu() for k, v in state.items()}))


def relative_drops(valid: dict, base: dict) -> dict[str, float]:
    """Per task, (base - variant) / base of the task's score metric (negative = better)."""
    return {t: (base[t][m] - valid[t][m]) / base[t][m] for t, m in SCORE_METRIC.items()
            if t in base and t in valid and base[t][m]}


def choose(variants: list[dict]) -> dict:
    """The smallest variant within budget on every task (ties: the smaller worst drop)."""
    ok = [v for v in variants if v["within_budget"]]
    return min(ok, key=lambda v: (v["bytes"], max(v["drops"].values(), default=0.0)))


def _variants(cfg: RunConfig, loss_cfg: RunConfig, inp: distill.Inputs, base, spec: StudentSpec) -> list[dict]:
    """[{name, parent, model, spec, state}]: every variant with the state dict it is stored as."""
    cc = cfg.compress
    data = {t: TASKS[t].tensors(tb, spec) for t, tb in inp.tables.items()}
    out = [{"name": "student", "parent": None, "model": base, "spec": spec, "state": base.state_dict()}]
    model, m = base, spec
    if cc.vocab_min_count:
        # the catalogue's text and every text task's training texts
        bags = [base.item_bag_ids] + [d["bag_values"] for d in data.values() if "bag_values" in d]
        model, m = shrink.prune_vocabulary(model, m, shrink.token_counts(spec, bags), min_count=cc.vocab_min_count,
                                           reserve=cc.vocab_reserve)
        say(f"[compress] vocabulary: {m.text_rows_kept:,} of {spec.vocab_size + spec.ngram_buckets:,} "
            f"text-table rows used by the catalogue and the training texts kept")
    model, m = shrink.fold_item_text(model, m)
    out.append({"name": "student_compact", "parent": "student", "model": model, "spec": m,
                "state": quant.narrow_ints(model.state_dict())})
    for keep in cc.unit_keep:
        pruned, pm = shrink.prune_units(model, m, keep)
        loss = finetune(pruned, loss_cfg, inp.tasks, data, inp.shares, cc.finetune_steps, cfg.seed, inp.loss_context)
        say(f"[compress] kept {keep:.0%} of the hidden units and text columns ({shrink.params(pruned):,} parameters), "
            f"fine-tuned {cc.finetune_steps} steps (mean loss {loss:.4f})")
        out.append({"name": f"student_units{round(keep * 100)}", "parent": "student_compact", "model": pruned,
                    "spec": pm, "state": quant.narrow_ints(pruned.state_dict())})
    if cc.int8:
        for v in list(out):
            state = quant.quantize_state(v["state"])
            out.append({**v, "name": v["name"] + "_int8", "parent": v["name"], "state": state,
                        "model": S.from_state(v["spec"], quant.dequantize_state(state)).eval()})
    return out


def _work(cfg: RunConfig, loss_cfg: RunConfig, inp: distill.Inputs, model_dir: str, threads: int) -> dict:
    """The stage's compute, run as one Ray task: every variant built, evaluated and timed."""
    torch.set_num_threads(threads)
    base, tok, spec = S.load(model_dir)
    cc = cfg.compress
    candidates = _variants(cfg, loss_cfg, inp, base, spec)

    def evaluate(v, split):
        return evaluation.evaluate(evaluation.student_predictors(v["model"], tok, v["spec"], inp.tasks), inp.prepare_dir, split,
                                   n_items=spec.n_items, max_history=spec.history_window, seed=cfg.seed)

    say(f"[compress] timing {len(candidates)} variants on one CPU thread ({cc.latency_requests} requests each, "
        "interleaved)")
    speed = latency.measure_latency({v["name"]: latency.student_server(v["model"], tok, v["spec"]) for v in candidates},
                                    latency.requests(inp.prepare_dir, inp.tasks, cc.latency_requests, cfg.seed),
                                    repeats_256=25)  # the median of 25 batches (~20 ms each): one is too noisy to rank variants
    variants, by_name = [], {}
    for v in candidates:
        valid, test = evaluate(v, "valid"), evaluate(v, "test")  # test only reported: the choice reads valid
        drops = relative_drops(valid, variants[0]["valid"] if variants else valid)
        row = {"name": v["name"], "parent": v["parent"], "int8": quant.is_quantized(v["state"]),
               "bytes": _bytes(v["state"]), "params": shrink.params(v["model"]),
               "shape": {k: getattr(v["spec"], k) for k in ("text_dim", "text_rows_kept", "ctr_hidden", "class_hidden",
                                                       "item_text")},
               "p50_ms": speed[v["name"]]["cpu_latency_ms"]["p50"],
               "throughput_b256": speed[v["name"]]["cpu_throughput"]["batch256"],
               "valid": valid, "drops": drops,
               "test": test, "test_drops": relative_drops(test, variants[0]["test"] if variants else test),
               "budgets": {t: cc.budget(t) for t in drops},
               "within_budget": all(d <= cc.budget(t) for t, d in drops.items())}
        parent = by_name.get(v["parent"])
        if parent:
            row["vs_parent"] = {"bytes": parent["bytes"] / row["bytes"], "p50": parent["p50_ms"] / row["p50_ms"],
                                "throughput_b256": row["throughput_b256"] / parent["throughput_b256"]}
            row["smaller_or_faster"] = row["bytes"] < parent["bytes"] or row["throughput_b256"] > parent["throughput_b256"]
        variants.append(row)
        by_name[row["name"]] = row
        # no relative drop where the uncompressed score is 0 (an untrained or degenerate task)
        line = "  ".join(f"{t}={valid[t][m]:.4f}" + (f" ({-drops[t]:+.2%})" if t in drops else "")
                         for t, m in SCORE_METRIC.items() if t in valid)
        say(f"[compress] {row['name']:<24} {row['bytes'] / 1e6:6.2f} MB  {row['params']:>10,} params  "
            f"p50 {row['p50_ms']:.3f} ms  b256 {row['throughput_b256']:,.0f}/s  {line}"
            f"{'' if row['within_budget'] else '  (over budget)'}")
    chosen = choose(variants)
    kept = next(v for v in candidates if v["name"] == chosen["name"])
    return {"variants": variants, "chosen": chosen, "state": kept["state"], "spec": kept["spec"]}


def run(cfg: RunConfig, out_dir: str) -> dict:
    import pyarrow.parquet as pq
    import ray
    from transformers import AutoTokenizer

    winner = RunLayout(cfg.run_dir).winner()
    model_dir, layout, out = winner.folder, RunLayout(cfg.run_dir), CompressDir(out_dir)
    with storage.local_copy(model_dir) as local:  # the bundle's tokenizer; the weights load in the task
        tok = AutoTokenizer.from_pretrained(local)
    loss_cfg, source = cfg, "distill"
    if winner.source == "tune":  # fine-tuned with the loss settings the winning trial was trained with
        loss_cfg, source = with_trial(cfg, winner.params), f"tune (trial {winner.trial_id})"
    say(f"[compress] compressing the student from {source}: {model_dir}")
    inp = distill.inputs(loss_cfg)
    threads = max(1, math.floor(cfg.compress.cpus))
    work = ray.remote(num_cpus=cfg.compress.cpus)(_work)
    result = ray.get(work.remote(cfg, loss_cfg, inp, model_dir, threads))
    chosen = result["chosen"]
    storage.write_json(out.variants, result["variants"])
    teacher_metrics = storage.read_json(layout.teacher.metrics)
    metrics = {"variant": chosen["name"], "source": source, "valid": chosen["valid"], "test": chosen["test"],
               "drops": chosen["drops"], "teacher": {"valid": teacher_metrics["valid"], "test": teacher_metrics["test"]}}
    storage.write_json(out.metrics, metrics)

    fs, path = storage.resolve(layout.prepare.items)
    items = pq.read_table(path, filesystem=fs, columns=["idx", "item_id", "title", "category", "category_idx", "clicks"])
    # student_dir: the uncompressed student, which a warm start continues from
    config = {"spec": result["spec"].to_json(), "weights": "int8-rowwise" if chosen["int8"] else "float32",
              "variant": chosen["name"], "source": source, "run_dir": cfg.run_dir, "student_dir": model_dir}
    manifest = bundle.write(layout.bundle, state=result["state"], config=config, tokenizer=tok,
                            items=items, metrics=metrics)
    base = result["variants"][0]
    say(f"[compress] kept {chosen['name']}: {chosen['bytes'] / 1e6:.2f} MB against {base['bytes'] / 1e6:.2f} MB "
        f"({base['bytes'] / chosen['bytes']:.1f}x smaller); bundle in {layout.bundle} "
        f"({len(manifest['files'])} files, verified by `distillery verify`)")
    return {"chosen": chosen["name"], "bytes": chosen["bytes"], "fp32_bytes": base["bytes"],
            "drops": chosen["drops"], "variants": {v["name"]: {"bytes": v["bytes"], "within_budget": v["within_budget"]}
                                                   for v in result["variants"]}}


__all__ = ["run", "finetune", "relative_drops", "choose"]
