"""How the sequence models' next-item loss weighs its targets, on Amazon Office (in process, no Ray
Train): the ID-only SASRec baseline (and, with --text, one text+ID teacher member) trained as the
teacher stage trains them (loop.fit, AdamW 1e-3, 256 length-bucketed sequences per step, validation
every 5 epochs, patience 5), once per variant and seed, then scored on the test split:

  batch   each step's loss is the mean over its targets (`teacher.sequence.weighting=batch`)
  target  every target of the epoch weighs the same (`teacher.sequence.weighting=target`)
  random  randomly drawn batches, each the mean over its targets (the usual SASRec recipe; ~3x the
          time, since a batch pads to its longest history)

    python benchmarks/seq_weighting.py [--variants batch,target,random] [--seeds 0,1] [--text]
                                       [--dim 64] [--dropout 0.5]

Writes benchmarks/results/seq_weighting_office.json (every run, and per variant the mean and std of
valid and test NDCG@10) and a PNG beside it. The prepare stage runs once into --work.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

import office
import torch

from distillery import loop, runner, storage  # noqa: E402  (office puts platform/ on the path)
from distillery.data.examples import read_items, read_split, vocab_size  # noqa: E402
from distillery.histories import pad_list_array  # noqa: E402
from distillery.layout import RunLayout  # noqa: E402
from distillery.models.seqrec import NextItemLoss, SequenceModel  # noqa: E402
from distillery.models.teacher import SeqMember  # noqa: E402
from distillery.losses import MemberLoss  # noqa: E402
from distillery.teaching.item_text import encode_items  # noqa: E402
from distillery.teaching.sequence import evaluate_member, seq_spec, sequence_batches, user_sequences  # noqa: E402

VARIANTS = ("batch", "target", "random")


def random_batches(seqs: torch.Tensor, steps: int, gen: torch.Generator) -> list[dict]:
    out = []
    for rows in torch.tensor_split(torch.randperm(len(seqs), generator=gen), steps):
        s = seqs[rows]
        out.append({"sequences": s[:, -max(int((s != 0).sum(1).max()), 2):]})
    return out


def train(cfg, prep: str, variant: str, seed: int, item_text: torch.Tensor | None, dim: int, dropout: float) -> dict:
    """One model as the teacher stage builds it (`seq_spec`): ID-only, or text+ID with `item_text`."""
    sc, n_items = cfg.teacher.sequence, vocab_size(prep)
    spec = seq_spec(cfg, n_items, 0 if item_text is None else item_text.shape[1], dim=dim, dropout=dropout,
                    item_text=item_text is not None)
    seqs = pad_list_array(user_sequences(read_split(prep, "recommendation", "train")).column("sequence"),
                          spec.max_history + 1)
    steps = math.ceil(len(seqs) / sc.batch_size)
    torch.manual_seed(loop.epoch_seed(seed, 0, 0, stream=1))
    member = SeqMember(SequenceModel(spec, item_text))
    loss = MemberLoss(member, NextItemLoss(), {"next_item": 1.0})
    optim = torch.optim.AdamW(member.parameters(), lr=sc.lr, weight_decay=sc.weight_decay)

    def batches(gen):
        if variant == "random":
            return random_batches(seqs, steps, gen)
        return sequence_batches(seqs, None, steps, 1, gen, "cpu", per_target=variant == "target")

    def validate():
        valid = evaluate_member(member, prep, "valid", ["recommendation"], n_items, spec.max_history, 0)
        return valid["recommendation"]["ndcg@10"], valid

    best = {}

    def keep(state, improved):
        if improved:
            best["weights"] = {k: v.clone() for k, v in member.state_dict().items()}

    def log(epoch, entry, improved):
        print(f"[{variant}{'+text' if item_text is not None else ''} seed {seed}] epoch {epoch + 1}  "
              f"loss={entry['loss']['total']:.4f}  valid ndcg@10={entry['valid']['recommendation']['ndcg@10']:.4f}"
              f"{'  *best' if improved else ''}  ({entry['seconds']}s)", flush=True)

    t0 = time.perf_counter()
    plan = loop.Plan(epochs=sc.epochs, patience=sc.patience, eval_every=sc.eval_every, clip=5.0, seed=seed)
    state = loop.fit(member, optim, None, plan, batches=batches, loss=loss, validate=validate, on_validated=keep,
                     log=log)
    member.load_state_dict(best["weights"])
    test = evaluate_member(member, prep, "test", ["recommendation"], n_items, spec.max_history, 0)["recommendation"]
    return {"variant": variant, "text": item_text is not None, "seed": seed, "valid_ndcg@10": state["best"],
            "test_ndcg@10": test["ndcg@10"], "test": test, "epochs": state["epoch"] + 1,
            "seconds": round(time.perf_counter() - t0)}


def summary(runs: list[dict]) -> dict:
    out = {}
    for r in runs:
        out.setdefault(f"{r['variant']}{'+text' if r['text'] else ''}", []).append(r)
    return {k: {m: {"mean": statistics.fmean(x[m] for x in rs),
                    "std": statistics.stdev(x[m] for x in rs) if len(rs) > 1 else 0.0, "runs": len(rs)}
                for m in ("valid_ndcg@10", "test_ndcg@10")} for k, rs in out.items()}


def plot(summ: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summ)
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 3.5))
    for i, (m, off) in enumerate((("valid_ndcg@10", -0.2), ("test_ndcg@10", 0.2))):
        ax.bar([j + off for j in range(len(names))], [summ[n][m]["mean"] for n in names], 0.4,
               yerr=[summ[n][m]["std"] for n in names], label=m)
    ax.axhline(0.0635, color="grey", ls="--", lw=1, label="0.0635 (a library's SASRec, test)")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("NDCG@10")
    ax.set_title("Office: next-item loss weighting\n(SASRec ID-only; +text: a teacher member)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = office.parser(__doc__, work="runs/seq_weighting", work_help="run directory for the prepare stage",
                      out="seq_weighting_office.json")
    p.add_argument("--variants", default="batch,target,random", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds")
    p.add_argument("--text", action="store_true", help="also train one text+ID teacher member per variant and seed")
    p.add_argument("--dim", type=int, default=64, help="width of every model (the measured README numbers: 64)")
    p.add_argument("--dropout", type=float, default=0.5, help="dropout of every model (measured: 0.5)")
    args = p.parse_args()
    variants = args.variants.split(",")
    if bad := [v for v in variants if v not in VARIANTS]:
        p.error(f"unknown variants {bad}: use {', '.join(VARIANTS)}")
    cfg = office.config(args, args.work, "tasks.intent.enabled=false", "tasks.ctr.enabled=false")
    if cfg is None:
        return 0
    torch.set_num_threads(max(1, math.floor(cfg.teacher.cpus_per_worker)))
    prep = RunLayout(cfg.run_dir).prepare.root
    if not storage.exists(storage.join(prep, "manifest.json")):
        runner.run(cfg, ["prepare"])
    item_text = encode_items(cfg.teacher.model, read_items(prep)["text"].tolist(), cfg.teacher.max_length) \
        if args.text else None
    runs = [train(cfg, prep, v, int(s), t, args.dim, args.dropout)
            for s in args.seeds.split(",") for v in variants for t in ((None, item_text) if args.text else (None,))]
    out = Path(args.out)
    summ = summary(runs)
    out.write_text(json.dumps({"data": args.data, "sequence": {**cfg.teacher.sequence.model_dump(), "dim": args.dim,
                                                               "dropout": args.dropout}, "summary": summ,
                               "runs": runs}, indent=1))
    plot(summ, out.with_suffix(".png"))
    for name, s in summ.items():
        print(f"{name:14s} valid {s['valid_ndcg@10']['mean']:.4f}  test {s['test_ndcg@10']['mean']:.4f} "
              f"± {s['test_ndcg@10']['std']:.4f}  ({s['test_ndcg@10']['runs']} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
