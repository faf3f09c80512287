"""The `label` stage: the fine-tuned teacher labels every example of every split, as a Ray Train job.

Ray Data holds the prepared examples; each Train worker reads its shard (`get_dataset_shard`) and
runs the teacher in inference mode (bf16 on GPU; the encoder FSDP-sharded across the workers' GPUs
with `teacher.shard=fsdp`). Output, one row per example, joined to the examples by `example_id`:

    RUN_DIR/label/<task>/<split>/part-*.parquet   example_id, split, the task's label columns, fingerprint

with each task's label columns (`Task.label_fields`) and how the teacher makes them (`Task.label`)
in its module (`tasks/`), e.g. recommendation: top_ids [K], top_scores [K], target_score; ctr:
logit; intent: logits [n_intents].

Recommendation scores are over the whole catalogue with the user's history masked, as the ranking
metrics do; `target_score` is the true next item's score before masking.

Every label row also carries the example's `fingerprint`: a hash of what the teacher sees of it
(history and item, slot, or text; not its id, user or split). A warm-started run (`warmstart.py`)
copies the labels of fingerprints that the previous run's teacher already labelled with the same
settings, and sends only the others to the teacher.

Exactly once: Ray's default shard split evens shards by dropping rows, so this stage splits without
it. Workers write parts through a temporary name, and a (re)started worker first reads the example
ids already written and skips them, so neither a worker restart (FailureConfig) nor a re-run of an
interrupted stage labels an example twice. The stage ends by checking that the ids written per
task and split are exactly the prepared ones.
"""
from __future__ import annotations

import time
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from .. import storage, training
from ..config import RunConfig, stable_hash
from ..data.examples import ALL_SPLITS
from ..data.sources import read_parquet
from ..errors import StageError
from ..layout import LabelDir, RunLayout
from ..models.teacher import Teacher, read_spec, set_threads
from ..progress import say
from ..tasks import TASKS, LabelContext
from ..tasks.text import tokenize_batch

# ------------------------------------------------------------------------------ fingerprints
def fingerprints(task: str, batch: pa.Table) -> pa.Array:
    """[B] int64: `task`'s hash of what the teacher sees of each example (`Task.fingerprints`)."""
    return TASKS[task].fingerprints(batch)


def with_fingerprints(batch: pa.Table, task: str) -> pa.Table:
    """Ray Data map: the examples with their `fingerprint` column."""
    return batch.append_column("fingerprint", fingerprints(task, batch))


def settings(cfg: RunConfig) -> dict:
    """What besides the teacher's weights decides a label's value (batch sizes, workers and devices
    only change how fast labels come)."""
    return {"top_k": cfg.label.top_k, "max_length": cfg.teacher.max_length, "ctr_history": cfg.tasks.ctr.max_history}


def cache_key(cfg: RunConfig, teacher_sha256: str) -> str:
    """Labels of two runs with the same key are interchangeable, fingerprint for fingerprint."""
    return stable_hash({"teacher_sha256": teacher_sha256, **settings(cfg)})


# ------------------------------------------------------------------------------ output parts
def done_ids(out_dir: str, task: str) -> pa.Array:
    """Example ids already written for `task` (finished parts only: temporaries start with '.')."""
    return _ids(LabelDir(out_dir).task(task))


class PartWriter:
    """Buffers labelled rows per split and writes `rows_per_file`-row Parquet parts atomically."""

    def __init__(self, out_dir: str, task: str, prefix: str, rows_per_file: int):
        self.out_dir, self.task, self.prefix, self.rows_per_file = out_dir, task, prefix, rows_per_file
        self.buffers: dict[str, list[pa.Table]] = {s: [] for s in ALL_SPLITS}
        self.seq, self.rows = 0, 0

    def add(self, table: pa.Table) -> None:
        for split in ALL_SPLITS:
            part = table.filter(pc.equal(table.column("split"), split))
            if part.num_rows:
                self.buffers[split].append(part)
                if sum(t.num_rows for t in self.buffers[split]) >= self.rows_per_file:
                    self._flush(split)

    def close(self) -> None:
        for split in ALL_SPLITS:
            self._flush(split)

    def _flush(self, split: str) -> None:
        if not self.buffers[split]:
            return
        table = pa.concat_tables(self.buffers[split])
        self.buffers[split] = []
        name = f"part-{self.prefix}-{self.seq:05d}.parquet"
        self.seq += 1
        fs, folder = storage.resolve(LabelDir(self.out_dir).task(self.task, split))
        fs.create_dir(folder, recursive=True)
        tmp, final = f"{folder}/.{name}.tmp", f"{folder}/{name}"
        pq.write_table(table, tmp, filesystem=fs)
        fs.move(tmp, final)  # a part is either whole or absent
        self.rows += table.num_rows


# ------------------------------------------------------------------------------ the worker
def _fsdp_backbone(model: Teacher, device) -> None:
    """Shard the encoder (the large part) across the workers with FSDP2, one unit per transformer
    block; the small heads stay replicated. Works on CPU (gloo) as on GPUs (NCCL)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for backbone in model.backbones:  # one encoder per text classification task
        # the transformer blocks: the largest ModuleList, whatever the architecture calls it
        lists = [m for m in backbone.modules() if isinstance(m, torch.nn.ModuleList)]
        blocks = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()), default=[])
        for layer in blocks:
            fully_shard(layer, mesh=mesh)
        fully_shard(backbone, mesh=mesh)


def _lockstep(batches, sharded: bool, device):
    """Yield this worker's batches; under FSDP, keep yielding None until every worker is done, because
    each sharded forward is a collective that all workers must join."""
    if not sharded:
        yield from batches
        return
    import torch.distributed as dist

    it = iter(batches)
    while True:
        batch = next(it, None)
        more = torch.tensor([0 if batch is None else 1], device=device)  # NCCL reduces GPU tensors only
        dist.all_reduce(more)
        if int(more) == 0:
            return
        yield batch


def label_loop(config: dict) -> None:
    """Ray Train worker function: label this worker's shard of every task."""
    import ray.train
    import ray.train.torch

    from ..models.teacher import load_model

    cfg = RunConfig.model_validate(config["cfg"])
    lc, out_dir = cfg.label, config["out_dir"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    set_threads(lc.cpus_per_worker)
    device = ray.train.torch.get_device()
    model, tokenizer, spec = load_model(config["model_dir"])
    sharded = cfg.teacher.shard == "fsdp" and ctx.get_world_size() > 1
    if sharded:
        _fsdp_backbone(model, device)
    model.to(device).eval()
    autocast = training.autocast(device)
    with torch.no_grad(), autocast:
        items = model.item_vectors()  # from the item text embeddings saved with the teacher: computed once
    attempt = uuid.uuid4().hex[:8]  # a restarted worker never overwrites a finished part
    timings = {}
    ctx = LabelContext(cfg=cfg, tokenizer=tokenizer, spec=spec, items=items, device=device)

    for task in config["tasks"]:
        t = TASKS[task]
        skip = done_ids(out_dir, task)
        writer = PartWriter(out_dir, task, f"{attempt}-{rank:03d}", lc.rows_per_file)
        batches = ray.train.get_dataset_shard(task).iter_batches(batch_size=batch_size(t, lc), batch_format="pyarrow",
                                                                  prefetch_batches=4)
        start, last, seen = time.perf_counter(), time.perf_counter(), 0
        for batch in _lockstep(batches, sharded and t.reads_text, device):
            if batch is None:  # this worker is done; join the others' sharded forward with a dummy one
                with autocast:
                    t.label(model, pa.table({"text": ["."]}), ctx)
                continue
            seen += batch.num_rows
            if len(skip):
                batch = batch.filter(pc.invert(pc.is_in(batch.column("example_id"), value_set=skip)))
            if batch.num_rows == 0:
                continue
            with autocast:
                cols = t.label(model, batch, ctx)
            writer.add(pa.table({"example_id": batch.column("example_id"), "split": batch.column("split"), **cols,
                                 "fingerprint": batch.column("fingerprint")}, schema=t.label_schema))
            if time.perf_counter() - last > 15:
                last = time.perf_counter()
                say(f"[label] worker {rank} {task}: {seen:,} rows read, {writer.rows:,} written "
                    f"({seen / (last - start):,.0f} rows/s)")
        writer.close()
        took = time.perf_counter() - start
        timings[task] = {"rows": writer.rows, "seconds": round(took, 3)}
        say(f"[label] worker {rank} {task}: {writer.rows:,} labelled in {took:.1f}s "
            f"({writer.rows / max(took, 1e-9):,.0f} rows/s)" + (f"; {len(skip):,} were already done" if len(skip) else ""))
    storage.write_json(storage.join(LabelDir(out_dir).timings, f"{rank:03d}.json"), timings)
    ray.train.report({"done": 1})


# ------------------------------------------------------------------------------ the stage
def batch_size(task, lc) -> int:
    """Examples per teacher forward: a text task's are longer than a history (`label.text_batch_size`)."""
    return lc.text_batch_size if task.reads_text else lc.batch_size


def tokenize_in(lc) -> str:
    """'data' or 'worker'. On a GPU the worker's CPU time is the GPU's idle time, so Ray Data
    tokenizes on the node's other CPUs; on CPU the hand-off only adds work: in one benchmark run on
    2 cores (not interleaved, so rough) intent labeling took 37 s with Ray Data tokenizing and 15 s
    with the worker tokenizing."""
    return lc.tokenize if lc.tokenize != "auto" else ("data" if lc.use_gpu else "worker")


def exact_split():
    """A `ray.train.DataConfig` that splits each dataset across workers without evening the shards:
    the default `streaming_split(equal=True)` may drop rows, and every example needs its label."""
    import ray.train

    class ExactSplit(ray.train.DataConfig):
        # DataConfig.configure of Ray 2.60 with equal=False (ray is pinned; recheck on upgrade)
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            out = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                for i, split in enumerate(ds.streaming_split(world_size, equal=False)):
                    out[i][name] = split
            return out

    return ExactSplit()


def expected_counts(cfg: RunConfig) -> dict[str, dict[str, int]]:
    manifest = storage.read_json(RunLayout(cfg.run_dir).prepare.manifest)
    return {t: manifest["examples"][t] for t in cfg.tasks.enabled() if t in manifest.get("examples", {})}


def verify(cfg: RunConfig, out_dir: str, tasks) -> dict[str, dict[str, int]]:
    """Labelled ids == prepared ids for every task and split; a StageError naming the first mismatch."""
    prep = RunLayout(cfg.run_dir).prepare
    counts = {}
    for task in tasks:
        counts[task] = {}
        for split in TASKS[task].label_splits:
            want_dir, got_dir = prep.examples(task, split), LabelDir(out_dir).task(task, split)
            want, got = _ids(want_dir), _ids(got_dir)
            unique = pc.unique(got)
            missing = len(want) - (pc.sum(pc.is_in(want, value_set=unique).cast(pa.int64())).as_py() or 0)
            if missing or len(got) != len(want) or len(unique) != len(got):
                raise StageError(
                    f"label count mismatch for {task}/{split}: {len(got)} labels ({len(got) - len(unique)} "
                    f"duplicated, {missing} examples unlabelled) for {len(want)} prepared examples in {want_dir}. "
                    f"Re-run with --force to label from scratch.")
            counts[task][split] = len(got)
    return counts


def _remove_temporaries(out_dir: str) -> None:
    """Half-written parts of killed workers (never read: their names start with '.')."""
    import pyarrow.fs as pafs

    fs, path = storage.resolve(out_dir)
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        if info.type == pafs.FileType.File and info.base_name.startswith(".part-"):
            fs.delete_file(info.path)


def _ids(folder: str) -> pa.Array:
    """Example ids of the Parquet files under `folder`, at any depth; none if it has none yet
    (`list_files` skips the dot-named temporaries)."""
    files = storage.list_files(folder, (".parquet",)) if storage.exists(folder) else []
    if not files:
        return pa.array([], pa.string())
    fs, _ = storage.resolve(folder)
    return pa.chunked_array([pq.read_table(storage.resolve(f)[1], columns=["example_id"], filesystem=fs).column(0)
                             for f in files], pa.string()).combine_chunks()


def run(cfg: RunConfig, out_dir: str) -> dict:
    layout, out = RunLayout(cfg.run_dir), LabelDir(out_dir)
    model_dir = layout.teacher.model
    if not storage.exists(storage.join(model_dir, "model.safetensors")):
        raise StageError(f"no teacher model in {model_dir}: run the teacher stage first (--stages teacher,label)")
    tasks = [t for t in cfg.tasks.enabled() if t in expected_counts(cfg)]
    lc = cfg.label
    teacher_sha256 = storage.sha256(storage.join(model_dir, "model.safetensors"))
    key = cache_key(cfg, teacher_sha256)
    # Materialized before the workers start: a worker holding most CPUs of a small machine would
    # otherwise starve the read tasks of its own input.
    examples = {t: read_parquet(layout.prepare.examples(t), columns=["example_id", "split", *TASKS[t].teacher_inputs])
                .map_batches(with_fingerprints, fn_kwargs={"task": t}, batch_format="pyarrow").materialize()
                for t in tasks}
    totals = {t: ds.count() for t, ds in examples.items()}
    total = sum(totals.values())
    from .. import warmstart

    reused = reuse_labels(examples, out_dir, warmstart.label_source(cfg), key, lc.rows_per_file)
    datasets = _still_to_label(examples, out_dir, reused, lc)
    todo = {t: ds.count() for t, ds in datasets.items()}  # for the teacher in this attempt
    say(f"[label] to the teacher: {sum(todo.values()):,} of {total:,} examples "
        + ", ".join(f"{t}={todo[t]:,}/{totals[t]:,}" for t in tasks))
    for t in datasets:
        if TASKS[t].reads_text and tokenize_in(lc) == "data":  # streamed: tokenized while the workers label
            datasets[t] = _tokenized(datasets[t], model_dir, cfg)
    trainer = training.torch_trainer(
        label_loop, {"cfg": cfg.model_dump(mode="json"), "out_dir": out_dir, "model_dir": model_dir, "tasks": tasks},
        datasets, lc, name="label", storage_path=out.ray_train, keep_checkpoints=None, dataset_config=exact_split())
    storage.remove(out.timings)  # an interrupted attempt's timings are not this run's
    start = time.perf_counter()
    if sum(todo.values()):
        training.fit(trainer)
    took = time.perf_counter() - start
    counts = verify(cfg, out_dir, tasks)
    seconds = _labeling_seconds(out_dir)
    for path in (out.ray_train, out.timings):
        storage.remove(path)
    _remove_temporaries(out_dir)
    labelled = {t: totals[t] - reused.get(t, 0) for t in tasks}  # by the teacher, in this or an interrupted attempt
    return {"examples": counts,
            "counts": {"labels": total, "labelled": sum(labelled.values()), "reused": sum(reused.values()),
                       "rows_per_s": round(sum(todo.values()) / took, 1) if sum(todo.values()) else None},
            "labelled": labelled, "reused": reused, "labeling_seconds": seconds, "train_job_seconds": round(took, 2),
            "teacher_sha256": teacher_sha256, "cache_key": key,
            "top_k": lc.top_k, "workers": lc.num_workers, "use_gpu": lc.use_gpu}


def _still_to_label(examples: dict, out_dir: str, reused: dict[str, int], lc) -> dict:
    """{task: the examples without a label in `out_dir` yet (neither reused nor written by an
    interrupted attempt)}, in blocks of a few batches each, so the workers share every task however
    the files were cut."""
    datasets = {}
    for t, ds in examples.items():
        done = done_ids(out_dir, t)
        if len(done):
            ds = ds.map_batches(_without, fn_kwargs={"ids": done}, batch_format="pyarrow")
        datasets[t] = ds.repartition(target_num_rows_per_block=4 * batch_size(TASKS[t], lc)).materialize()
        if len(done) > reused.get(t, 0):
            say(f"[label] {t}: {len(done) - reused.get(t, 0):,} examples were labelled by an interrupted attempt; kept")
    return datasets


def _tokenized(ds, model_dir: str, cfg: RunConfig):
    """A text task's examples with the teacher's inputs added by Ray Data tasks (`tokenize_batch`)."""
    from transformers import AutoTokenizer

    with storage.local_copy(model_dir) as local:
        tokenizer = AutoTokenizer.from_pretrained(local)
        spec = read_spec(local)
    return ds.map_batches(
        tokenize_batch, batch_format="pyarrow", batch_size=None, num_cpus=cfg.label.tokenize_cpus,
        # one task per CPU Ray Data gave it: no tokenizer thread pool over every core on top of that
        runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
        fn_kwargs={"tokenizer": tokenizer, "max_length": cfg.teacher.max_length,
                   "buckets": spec.lexical_buckets if spec.lexical_dim else 0})


def _without(batch: pa.Table, ids: pa.Array) -> pa.Table:
    return batch.filter(pc.invert(pc.is_in(batch.column("example_id"), value_set=ids)))


def reuse_labels(examples: dict, out_dir: str, source: str | None, key: str, rows_per_file: int) -> dict[str, int]:
    """Copy into `out_dir` the labels that the label stage in `source` (a previous run's) made for
    the same fingerprints, when its cache key is `key`; returns the copies per task (an interrupted
    attempt's included: they are not made twice). Copies keep this run's example ids and splits."""
    import ray

    if source is None:
        return {}
    earlier = LabelDir(source)
    manifest = storage.read_json(earlier.manifest) if storage.exists(earlier.manifest) else None
    if manifest is None or manifest.get("status") != "complete":
        say(f"[label] no finished label stage in {source} to reuse labels from: the teacher labels every example")
        return {}
    if manifest.get("cache_key") != key:
        say(f"[label] the labels in {source} came from another teacher or other settings "
            "(weights, label.top_k, teacher.max_length or tasks.ctr.max_history): the teacher labels every example")
        return {}
    reused = {}
    for task, ds in examples.items():
        need = pa.concat_tables([ray.get(r) for r in ds.select_columns(["example_id", "split", "fingerprint"]).to_arrow_refs()])
        need = need.filter(pc.invert(pc.is_in(need.column("example_id"), value_set=done_ids(out_dir, task))))
        writer = PartWriter(out_dir, task, f"cache-{uuid.uuid4().hex[:8]}", rows_per_file)
        cached = earlier.task(task)
        for path in storage.list_files(cached, (".parquet",)) if storage.exists(cached) else []:
            if not need.num_rows:
                break
            fs, p = storage.resolve(path)
            part = pq.read_table(p, filesystem=fs, columns=["fingerprint", *TASKS[task].label_columns])
            at = pc.index_in(need.column("fingerprint"), value_set=part.column("fingerprint"))
            hit = pc.is_valid(at)
            if not pc.any(hit).as_py():
                continue
            rows, labels = need.filter(hit), part.take(at.filter(hit))
            writer.add(pa.table({"example_id": rows.column("example_id"), "split": rows.column("split"),
                                 **{c: labels.column(c) for c in TASKS[task].label_columns},
                                 "fingerprint": rows.column("fingerprint")}, schema=TASKS[task].label_schema))
            need = need.filter(pc.invert(hit))
        writer.close()
        reused[task] = sum(pq.read_metadata(storage.resolve(f)[1], filesystem=storage.resolve(f)[0]).num_rows
                           for f in storage.list_files(LabelDir(out_dir).task(task), (".parquet",))
                           if f.rsplit("/", 1)[-1].startswith("part-cache-"))
    say("[label] reused from " + source + ": " + ", ".join(f"{t}={n:,}" for t, n in reused.items()))
    return reused


def _labeling_seconds(out_dir: str) -> dict[str, float]:
    """Per task, the slowest worker's time from its first batch to its last part written (this run:
    startup excluded; it is `train_job_seconds` minus these)."""
    folder = LabelDir(out_dir).timings
    out: dict[str, float] = {}
    for path in storage.list_files(folder, (".json",)) if storage.exists(folder) else []:
        for task, t in storage.read_json(path).items():
            out[task] = max(out.get(task, 0.0), t["seconds"])
    return out
