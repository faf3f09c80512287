"""The `teacher` stage: train the teacher and the baselines it must beat, then evaluate them all.

Steps, each kept when finished and the stage is re-run (the training is `teaching/`):
1. item text: the frozen encoder embeds every item's text once (a Ray task, on a GPU when
   `teacher.use_gpu`) -> RUN_DIR/teacher/item_text.safetensors.
2. the SASRec baseline: one ID-only sequence model per (dim, dropout) of `teacher.sasrec`, each
   trained until validation NDCG@10 stops improving -> RUN_DIR/teacher/sasrec/<name>/.
3. the sequence teacher: text+ID sequence models with their click heads, one per (width, dropout)
   of `teacher.sequence` -> RUN_DIR/teacher/members/<name>/. Per width, the dropout with the best
   validation score is kept, and `members` - 1 more seeds of it are trained; the kept models are
   the teacher's ensemble.
4. text classification (each task that `classifies`): an encoder and its lexical bag fine-tuned on
   the task's texts until its validation score stops improving -> RUN_DIR/teacher/<task>/.
Then the parts are assembled into one `Teacher` (RUN_DIR/teacher/model/) and every model is
evaluated on the test split: RUN_DIR/teacher/metrics.json =
{"valid", "test", "baselines": {task: {name: metrics}}, "sasrec_grid": [...], "teacher_grid": [...], ...}.
"""
from __future__ import annotations

import dataclasses

from .. import evaluation, storage, warmstart
from ..config import RunConfig
from ..data.examples import read_items, vocab_size
from ..errors import StageError
from ..layout import PartDir, PrepareDir, RunLayout, TeacherDir
from ..models.seqrec import SeqSpec
from ..models.teacher import Teacher, TeacherSpec, build, build_member, load_backbone, load_model, load_weights, save_model
from ..progress import say
from ..tasks import TASKS, baselines, mean_metric
from ..teaching.grid import Trained, choose_members
from ..training import Best
from ..teaching.item_text import item_text_embeddings
from ..teaching.runs import train_models
from ..teaching.sequence import SequenceTasks, evaluate_member, history_window, seq_spec


def teacher_spec(cfg: RunConfig, prepare_dir: str, text_dim: int,
                 sequences: tuple[SeqSpec, ...] | None = None) -> TeacherSpec:
    """The teacher this run trains (`text_dim`: the encoder's width). `sequences`: its members, known
    once the grid has trained and chosen; by default one per width and seed at the first dropout."""
    items = read_items(prepare_dir)
    cats = storage.read_json(PrepareDir(prepare_dir).vocab("categories"))
    tasks = list(cfg.tasks.enabled())
    sc, n_items = cfg.teacher.sequence, vocab_size(prepare_dir)
    if sequences is None:
        sequences = [seq_spec(cfg, n_items, text_dim, dim=d, dropout=sc.dropouts[0]) for d in sc.dims
                     for _ in range(sc.members)]
    classes = {t: TASKS[t].labels(prepare_dir) for t in tasks if TASKS[t].classifies}
    return TeacherSpec(n_items=n_items, classes=classes, n_categories=len(cats), max_history=history_window(cfg),
                       max_length=cfg.teacher.max_length, lexical_dim=cfg.teacher.lexical_dim,
                       lexical_buckets=cfg.teacher.lexical_buckets,
                       item_category=(0, 1, *items["category_idx"].tolist()), tasks=tuple(tasks),
                       sequences=tuple(sequences) if SequenceTasks.of(tasks) else ())


def evaluate(model: Teacher, tokenizer, prepare_dir: str, split: str, tasks, max_length: int,
             device="cpu", batch: int = 512, seed: int = 0) -> dict:
    """Metrics of `model` on one split of every task (the metric module's names)."""
    return evaluation.evaluate(evaluation.teacher_predictors(model, tokenizer, tasks, max_length, device), prepare_dir,
                               split, n_items=vocab_size(prepare_dir), max_history=model.max_history, seed=seed,
                               batch=batch)


def sasrec_test(teacher_dir: str, metrics: dict, prepare_dir: str, tasks, tspec: TeacherSpec, seed: int) -> dict:
    """{task: test metrics} of the SASRec baseline that `metrics` (a teacher metrics.json) chose,
    loaded from `teacher_dir`/sasrec/<name>, on every sequence task of `tasks` (its click score is
    its next-item score)."""
    chosen = metrics.get("sasrec_chosen")
    if not chosen:
        return {}
    spec = SeqSpec.from_json(next(r["spec"] for r in metrics["sasrec_grid"] if r["name"] == chosen))
    model = build_member(spec, tspec, ctr_head=False)
    model.load_state_dict(load_weights(TeacherDir(teacher_dir).sasrec(chosen).weights))
    return evaluate_member(model, prepare_dir, "test", SequenceTasks.of(tasks).names, tspec.n_items,
                           spec.max_history, seed)


def assemble(out: TeacherDir, backbone, tspec: TeacherSpec, text, members: list[Trained]) -> Teacher:
    """The teacher from its trained parts: every text classifier and the chosen sequence members."""
    model = build(backbone, tspec, text, ctr_head=SequenceTasks.of(tspec.tasks).click is not None)
    state = model.state_dict()
    for task in tspec.classes:
        state.update({f"classifiers.{task}.{k}": v for k, v in load_weights(out.classifier(task).weights).items()})
    for i, r in enumerate(members):
        state.update({f"members.{i}.{k}": v for k, v in load_weights(PartDir(r.part.out_dir).weights).items()})
    model.load_state_dict(state)
    return model.eval()


def run(cfg: RunConfig, out_dir: str) -> dict:
    out = TeacherDir(out_dir)
    prepare_dir = RunLayout(cfg.run_dir).prepare.root
    tasks = cfg.tasks.enabled()
    backbone, tokenizer = load_backbone(cfg.teacher.model)  # fail here, with the path, not inside a worker
    hidden = backbone.config.hidden_size
    seq_tasks = SequenceTasks.of(tasks)
    uses_text = bool(seq_tasks) and cfg.teacher.sequence.item_text
    text = item_text_embeddings(cfg, out_dir) if uses_text else None
    text_dim = hidden if uses_text else 0
    tspec = teacher_spec(cfg, prepare_dir, text_dim)
    trained = train_models(cfg, out_dir, text_dim, tspec)
    members = choose_members(trained.teacher)
    tspec = dataclasses.replace(tspec, sequences=tuple(r.part.spec for r in members))
    model = assemble(out, backbone, tspec, text, members)
    save_model(model, tokenizer, tspec, out.model)

    valid = evaluate(model, tokenizer, prepare_dir, "valid", tasks, cfg.teacher.max_length, seed=cfg.seed)
    test = evaluate(model, tokenizer, prepare_dir, "test", tasks, cfg.teacher.max_length, seed=cfg.seed)
    base = baselines(prepare_dir, tasks, "test", cfg.seed)
    report = {"valid": valid, "test": test, "baselines": base, "sasrec_grid": [],
              "teacher_grid": [r.to_json() for r in trained.teacher], "teacher_members": [r.name for r in members]}
    if trained.sasrec:
        report["sasrec_grid"] = [r.to_json() for r in trained.sasrec]
        report["sasrec_chosen"] = max(trained.sasrec, key=lambda r: r.score).name
        for t, m in sasrec_test(out_dir, report, prepare_dir, tasks, tspec, cfg.seed).items():
            base.setdefault(t, {})["sasrec"] = m
    if tspec.classes:
        report["text_epochs"] = {t: Best.read(out.classifier(t).history).to_json() for t in tspec.classes}
    if len(model.members) > 1:  # what the ensemble buys: each member alone on the same test split
        report["members_test"] = [evaluate_member(m, prepare_dir, "test", seq_tasks.names, tspec.n_items,
                                                  tspec.max_history, cfg.seed) for m in model.members]
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
    for task, spec in TASKS.items():
        if task in report["test"]:
            metric = spec.score_metric
            others = "  ".join(f"{name}={m[metric]:.4f}" for name, m in report["baselines"].get(task, {}).items())
            print(f"  {task:<15} {metric:<9} teacher={report['test'][task][metric]:.4f}  {others}")
    for i, m in enumerate(report.get("members_test", [])):
        print(f"  member {i} alone: " + "  ".join(f"{t} {TASKS[t].score_metric}={v[TASKS[t].score_metric]:.4f}"
                                                  for t, v in m.items()))

    def grid(rows: list[dict]) -> str:
        return ", ".join(f"{r['name']} {grid_score(r):.4f} (epoch {r['best_epoch']})" for r in rows)

    if report.get("teacher_grid"):
        print(f"[teacher] sequence teacher: members {', '.join(report['teacher_members'])}, the seeds of the "
              f"dropout best on validation per width (grid: {grid(report['teacher_grid'])})")
    if report.get("sasrec_grid"):
        metric = SequenceTasks.of(report["sasrec_grid"][0]["valid"]).score_metric
        print(f"[teacher] SASRec baseline chosen on validation {metric}: {report['sasrec_chosen']} "
              f"(grid: {grid(report['sasrec_grid'])})")


def grid_score(row: dict) -> float:
    """A grid row's validation score (the next-item task's score metric, else the click task's)."""
    return row["score"] if "score" in row else SequenceTasks.of(row["valid"]).score(row["valid"])
