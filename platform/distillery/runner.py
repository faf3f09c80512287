"""Run stages into a run directory, each leaving RUN_DIR/<stage>/manifest.json.

A stage is skipped when its manifest records the same config hash, input fingerprints and upstream
manifests as now; `force=True` redoes it. A stage dir without a manifest is an interrupted run:
a resumable stage (Ray Train ones: they checkpoint) continues it when config and inputs are the
same as in the interrupted attempt; otherwise the dir is cleared and the stage runs again.
"""
from __future__ import annotations

import datetime as dt
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from . import __version__, storage, warmstart
from .config import RunConfig, stable_hash
from .errors import DataError, StageError
from .layout import RunLayout
from .stages import compress, distill, label, prepare, report, teacher, tune

STAGES = ("prepare", "teacher", "label", "distill", "tune", "compress", "report")


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[RunConfig, str], dict]
    config: Callable[[RunConfig], Any]  # the part of the config whose change invalidates the stage
    inputs: Callable[[RunConfig], list[str]]
    upstream: tuple[str, ...] = ()
    optional_upstream: tuple[str, ...] = ()  # used when they have run (the report of a run without a sweep)
    resumable: bool = False  # keeps an interrupted attempt's outputs (checkpoints) for the stage to resume


def _warm_start(cfg: RunConfig) -> dict:
    """The identity of the bundle a warm-started run continues from (its manifest's hash)."""
    src = warmstart.source(cfg)
    return {"warm_start": stable_hash(storage.read_json(storage.join(src.bundle, "manifest.json")))} if src else {}


def _prepare_config(cfg: RunConfig) -> dict:
    data = cfg.data.model_dump(mode="json", exclude={"show_rejects"})
    tasks = {name: getattr(cfg.tasks, name).model_dump(mode="json", exclude=set(getattr(cfg.tasks, name).LOSS_FIELDS))
             for name in type(cfg.tasks).model_fields}
    return {"seed": cfg.seed, "data": data, "tasks": tasks, **_warm_start(cfg)}


def _teacher_config(cfg: RunConfig) -> dict:
    if cfg.warm_start:  # the earlier run's teacher, whatever the teacher section says
        return {"seed": cfg.seed, "tasks": cfg.tasks.enabled(), "max_length": cfg.teacher.max_length, **_warm_start(cfg)}
    # the distillation's own settings (temperatures, soft/hard mixes) do not change the teacher
    tasks = {name: getattr(cfg.tasks, name).model_dump(
        mode="json", exclude=set(getattr(cfg.tasks, name).LOSS_FIELDS) - {"weight"}) for name in type(cfg.tasks).model_fields}
    return {"seed": cfg.seed, "teacher": cfg.teacher.model_dump(mode="json", exclude={"shard"}), "tasks": tasks}


def _teacher_run(cfg: RunConfig, out_dir: str) -> dict:
    return teacher.reuse(cfg, out_dir) if cfg.warm_start else teacher.run(cfg, out_dir)


def _label_config(cfg: RunConfig) -> dict:
    # what changes the labels' values; worker counts, devices and batch sizes only change how fast
    # they come, so changing those resumes an interrupted labeling instead of redoing it
    return {**label.settings(cfg), "tasks": cfg.tasks.enabled()}


def _distill_config(cfg: RunConfig) -> dict:
    # devices and CPUs change speed, not the result (the worker count changes the steps per epoch)
    return {"seed": cfg.seed, "student": cfg.student.model_dump(mode="json"),
            "distill": cfg.distill.model_dump(mode="json", exclude={"use_gpu", "cpus_per_worker"}),
            "tasks": cfg.tasks.model_dump(mode="json"), **_warm_start(cfg)}


AVAILABLE: dict[str, Stage] = {
    "prepare": Stage("prepare", prepare.run, _prepare_config, prepare.input_paths),
    "teacher": Stage("teacher", _teacher_run, _teacher_config, lambda cfg: [], upstream=("prepare",), resumable=True),
    "label": Stage("label", label.run, _label_config, lambda cfg: [], upstream=("prepare", "teacher"), resumable=True),
    "distill": Stage("distill", distill.run, _distill_config, lambda cfg: [], upstream=("prepare", "teacher", "label"),
                     resumable=True),
    "tune": Stage("tune", tune.run, lambda cfg: {**_distill_config(cfg), "tune": cfg.tune.model_dump(mode="json")},
                  lambda cfg: [], upstream=("prepare", "teacher", "label", "distill"), resumable=True),
    "compress": Stage("compress", compress.run, lambda cfg: {"compress": cfg.compress.model_dump(mode="json", exclude={"cpus"})},
                      lambda cfg: [], upstream=("prepare", "teacher", "label", "distill"), optional_upstream=("tune",)),
    "report": Stage("report", report.run, lambda cfg: {"seed": cfg.seed, "report": cfg.report.model_dump(mode="json")},
                    lambda cfg: [], upstream=("prepare", "teacher", "distill"), optional_upstream=("tune", "compress")),
}


def parse_stages(text: str | None, warm_start: bool = False) -> list[str]:
    if text is None or text.strip() == "all":
        return [s for s in STAGES if s in AVAILABLE and not (warm_start and s == "tune")]
    asked = [s.strip() for s in text.split(",") if s.strip()]
    if not asked:
        raise StageError(f"--stages {text!r} names no stage: give some of {','.join(STAGES)}, or leave "
                         "--stages out to run every stage")
    unknown = [s for s in asked if s not in STAGES]
    if unknown:
        raise StageError(f"unknown stage(s) {', '.join(unknown)}; stages are {', '.join(STAGES)}")
    missing = [s for s in asked if s not in AVAILABLE]
    if missing:
        raise StageError(f"stage(s) {', '.join(missing)} are not available in distillery {__version__} yet "
                         f"(available: {', '.join(AVAILABLE)})")
    return [s for s in STAGES if s in asked]  # pipeline order, whatever order they were given in


def manifest_path(run_dir: str, stage: str) -> str:
    return RunLayout(run_dir).manifest(stage)


def read_manifest(run_dir: str, stage: str) -> dict | None:
    path = manifest_path(run_dir, stage)
    return storage.read_json(path) if storage.exists(path) else None


def _expected(stage: Stage, cfg: RunConfig) -> dict:
    upstream = {}
    for name in stage.upstream:
        m = read_manifest(cfg.run_dir, name)
        if m is None:
            missing = [s for s in stage.upstream if read_manifest(cfg.run_dir, s) is None]
            raise StageError(f"stage {stage.name} needs the output of {', '.join(missing)} in {cfg.run_dir}: "
                             f"run with --stages {','.join([*missing, stage.name])}")
        upstream[name] = stable_hash(m)
    for name in stage.optional_upstream:  # only when made from this run's outputs, not left by an earlier one
        if RunLayout(cfg.run_dir).current(name):
            upstream[name] = stable_hash(read_manifest(cfg.run_dir, name))
    return {
        "config_hash": stable_hash(stage.config(cfg)),
        "inputs": {p: storage.fingerprint(p) for p in stage.inputs(cfg)},
        "upstream": upstream,
    }


def init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (as `ray job submit` sets), else start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:  # loopback only; Ray Train's state checks need the dashboard, and it shows progress too
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1")


def run(cfg: RunConfig, stages: list[str] | None = None, force: bool = False) -> dict[str, dict]:
    """Run `stages` (default: all available) in pipeline order; return their manifests."""
    names = parse_stages(None, warm_start=bool(cfg.warm_start)) if stages is None else stages
    if not names:
        raise StageError("no stage to run: name at least one")
    for n in names:
        if n not in AVAILABLE:
            raise StageError(f"stage {n!r} is not available (available: {', '.join(AVAILABLE)})")
    if cfg.warm_start and "tune" in names:
        raise StageError("a warm-started run does not tune: the sweep's trials train students from scratch, some of "
                         "other widths. Leave tune out of --stages, or tune in a run without --warm-start")
    if cfg.warm_start:
        warmstart.source(cfg)  # a bad bundle fails here, before any stage runs
    # absolute paths: `../data/x.parquet` and `/home/me/data/x.parquet` are one input, not two configs
    # (a relative path would also be read against another working directory by a job on a cluster)
    data = {k: storage.absolute(v) for k in ("items", "interactions", "reviews") if (v := getattr(cfg.data, k))}
    cfg = cfg.model_copy(update={"run_dir": storage.absolute(cfg.run_dir), "data": cfg.data.model_copy(update=data)})
    storage.makedirs(cfg.run_dir)
    storage.write_json(RunLayout(cfg.run_dir).config, cfg.model_dump(mode="json"))
    manifests = {}
    for name in names:
        stage = AVAILABLE[name]
        expected = _expected(stage, cfg)
        absent = [p for p, f in expected["inputs"].items() if f.get("exists") is False]
        if absent and cfg.data.reader != "hf":  # before Ray starts or old output goes; hf names datasets, not paths
            keys = {v: f"data.{k}" for k, v in data.items()}
            raise DataError("; ".join(f"{keys.get(p, 'input')}: {p} does not exist" for p in absent)
                            + ": check the path in your config or override")
        current = read_manifest(cfg.run_dir, name)
        if not force and current and current.get("status") == "complete" and all(
            current.get(k) == v for k, v in expected.items()
        ):
            print(f"[{name}] up to date: manifest matches config and inputs; skipped (--force redoes it)")
            manifests[name] = current
            continue
        out_dir = RunLayout(cfg.run_dir).stage(name)
        attempt = storage.join(out_dir, "_attempt.json")
        resume = (stage.resumable and not force and not current and storage.exists(attempt)
                  and storage.read_json(attempt) == expected)
        if not resume:
            storage.remove(out_dir)  # stale or different output must not mix with the new one
        else:
            print(f"[{name}] resuming an interrupted run (same config and inputs)")
        storage.makedirs(out_dir)
        storage.write_json(attempt, expected)
        init_ray()
        print(f"[{name}] running -> {out_dir}")
        start = time.perf_counter()
        result = stage.run(cfg, out_dir)
        manifest = {
            "stage": name, "status": "complete", "distillery_version": __version__,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            **expected, "wall_time_s": round(time.perf_counter() - start, 2), **result,
        }
        storage.write_json(manifest_path(cfg.run_dir, name), manifest)
        print(f"[{name}] done in {manifest['wall_time_s']:.1f}s: {summarize(manifest)}")
        manifests[name] = manifest
    return manifests


def summarize(manifest: dict) -> str:
    parts = [f"{k}={v}" for k, v in manifest.get("counts", {}).items()]
    for task, splits in manifest.get("examples", {}).items():
        parts.append(f"{task}=" + "/".join(str(splits.get(s, 0)) for s in ("train", "valid", "test"))
                     + (f"+{splits['transfer']} transfer" if splits.get("transfer") else ""))
    return ", ".join(parts)
