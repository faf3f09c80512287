"""Fault injection on a local Ray: a process is SIGKILLed mid-work and the stage must still finish
with the right output. Each test fills in `reliability` (benchmarks/reliability.py sums them up).

- a Ray Train worker of the teacher, then of the distillation: resumed from the last checkpoint,
  the final metrics equal those of an uninterrupted run (tolerance 1e-4: the same seeds and data
  order, so only float summation order could differ);
- a labeling worker: every example labelled exactly once;
- a Tune trial's process: the sweep finishes and reports that trial as failed;
- a Serve replica under steady load with two replicas: the failed requests and the time until two
  replicas serve again are measured.
The whole-pipeline kills (the driver killed mid-stage, then re-run) are in test_teacher_stage.py
and test_label_stage.py, marked `fault` too.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import checkpoint_part
from distillery.stages import distill, label, teacher
from distillery.stages import tune as dtune
from distillery.tasks import TASKS

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.fault, pytest.mark.usefixtures("ray_local")]
TOL = 1e-4


def alive(prefix: str) -> list:
    """Live actors whose class name starts with `prefix` (State API)."""
    from ray.util.state import list_actors

    return [a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000)
            if a.class_name.startswith(prefix) and a.pid]


class Killer(threading.Thread):
    """Once `ready()` holds, SIGKILLs the process of one live actor whose class starts with
    `prefix` (the first, by `pick`), if `confirm(actors)` still holds right before the kill: listing
    actors takes seconds, and what `ready` saw may have moved on by then. `.killed` is that actor,
    `.at` the time; None if it never fired."""

    def __init__(self, prefix: str, ready, *, delay: float = 0.0, timeout: float = 300.0, pick=lambda a: a[0],
                 confirm=lambda actors: True):
        super().__init__(daemon=True)
        self.prefix, self.ready, self.delay, self.timeout, self.pick = prefix, ready, delay, timeout, pick
        self.confirm = confirm
        self.killed = self.at = None
        self.stop = threading.Event()

    def run(self):
        deadline = time.time() + self.timeout
        while time.time() < deadline and not self.stop.is_set():
            if self.ready():
                time.sleep(self.delay)
                actors = alive(self.prefix)
                if actors and self.confirm(actors):
                    self.killed = self.pick(actors)
                    os.kill(self.killed.pid, signal.SIGKILL)
                    self.at = time.time()
                    return
            time.sleep(0.2)


def registered(run: Path, part: str | None = None) -> bool:
    """Whether the Train run in `run` has a checkpoint its controller knows of: the folder of one
    appears before that, and a worker killed in between restarts from scratch. With `part`, one of
    that part's (a run that trains several models in turn names the part in each checkpoint)."""
    snapshot = run / "checkpoint_manager_snapshot.json"
    if not snapshot.exists():
        return False
    text = snapshot.read_text()
    return any(d.name in text and (part is None or checkpoint_part(d) == part) for d in run.glob("checkpoint_*"))


def _fresh_run(cfg, root: Path, *parts: str):
    """A copy of `cfg`'s run dir (only `parts` of it) under `root`, and the config pointing there."""
    root.mkdir(parents=True)
    for part in parts:
        shutil.copytree(Path(cfg.run_dir) / part, root / part)
    return cfg.model_copy(update={"run_dir": str(root)})


def _close(a, b, path=""):
    """Every number in nested dicts a and b within TOL; the first difference named."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _close(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (int, float)):
        assert a == pytest.approx(b, abs=TOL), f"{path}: {a} vs {b}"


# ------------------------------------------------------------------------------ Ray Train workers
def _teacher_cfg(cfg, tiny_bert):
    return cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={
        "model": tiny_bert, "epochs": 1, "patience": 5, "cpus_per_worker": 1.0, "max_failures": 2,
        # 24 epochs of ~0.1 s, none stopped early: the member is still training when the kill lands
        "sequence": cfg.teacher.sequence.model_copy(update={"dims": [16], "epochs": 24, "eval_every": 2,
                                                            "patience": 100}),
        "sasrec": cfg.teacher.sasrec.model_copy(update={"dims": [16], "dropouts": [0.2]})})})


def test_teacher_worker_killed_mid_training_resumes_and_matches_an_uninterrupted_run(
        prepared, tiny_bert, tmp_path, reliability):
    base = _teacher_cfg(prepared[0], tiny_bert)
    clean = _fresh_run(base, tmp_path / "clean", "prepare")
    teacher.run(clean, str(tmp_path / "clean" / "teacher"))

    killed = _fresh_run(base, tmp_path / "killed", "prepare")
    out = tmp_path / "killed" / "teacher"
    # the sequence models' worker, once the member's first checkpoint (after epoch 2) is registered
    # (the SASRec baseline trains before it in the same Train run)
    killer = Killer("RayTrainWorker", lambda: registered(out / "ray_train" / "teacher", "teacher-d16-p0.5"),
                    delay=0.5)
    killer.start()
    teacher.run(killed, str(out))
    killer.stop.set()
    reliability["faults"] = int(killer.killed is not None)
    assert killer.killed, "no teacher worker was killed"
    history = json.loads((out / "members" / "teacher-d16-p0.5" / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, 24, 2))  # each validation once, across the kill
    restarts = [h["restarts"] for h in history]
    assert restarts[0] == 0 and restarts[-1] == 1 and restarts == sorted(restarts)  # resumed, not restarted
    a = json.loads((tmp_path / "clean" / "teacher" / "metrics.json").read_text())
    b = json.loads((out / "metrics.json").read_text())
    _close(a["valid"], b["valid"])
    _close(a["test"], b["test"])


def _small(cfg):
    return cfg.model_copy(update={
        "student": cfg.student.model_copy(update={"dims": [16], "text_dim": 8, "ngram_buckets": 512}),
        # ~4 s epochs: long enough for a kill to land mid-run
        "distill": cfg.distill.model_copy(update={"epochs": 3, "steps_per_epoch": 120, "batch_size": 64,
                                                  "cpus_per_worker": 1.0, "max_failures": 2}),
        # 3 epochs a trial: after the first checkpoint there is still time to find and kill the trial
        # (with 2, an idle machine finished the trial in the ~2 s the State API took to list it)
        "tune": cfg.tune.model_copy(update={"num_samples": 2, "epochs": 3, "max_concurrent_trials": 1,
                                            "grace_period": 3})})


def _distill_student(cfg, out: Path):
    """Only the KD student (the stage also trains the no-KD baseline, which adds nothing here)."""
    import ray

    inp = distill.inputs(cfg)
    datasets = {t: ray.data.from_arrow(tb).materialize() for t, tb in inp.tables.items()}
    result = distill.trainer(inp, cfg, [distill.StudentRun("student", str(out), "student")], datasets,
                             run_name="distill-student", storage_path=str(out.parent / "ray_train")).fit()
    assert result.error is None, result.error
    return distill.finish(inp, str(out))


@pytest.fixture(scope="module")
def distilled(labelled, tmp_path_factory):
    """A run dir with labels and one uninterrupted distilled student (the reference run)."""
    cfg = _fresh_run(_small(labelled[0]), tmp_path_factory.mktemp("faults") / "run", "prepare", "teacher", "label")
    metrics = _distill_student(cfg, Path(cfg.run_dir) / "distill" / "student")
    return cfg, metrics


def test_distill_worker_killed_mid_training_resumes_and_matches_an_uninterrupted_run(distilled, tmp_path, reliability):
    cfg, want = distilled
    killed = _fresh_run(cfg, tmp_path / "killed", "prepare", "teacher", "label")
    out = tmp_path / "killed" / "distill" / "student"
    killer = Killer("RayTrainWorker", lambda: registered(out.parent / "ray_train" / "distill-student"), delay=0.5)
    killer.start()
    got = _distill_student(killed, out)
    killer.stop.set()
    reliability["faults"] = int(killer.killed is not None)
    assert killer.killed, "no distillation worker was killed"
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 3 and history[0]["restarts"] == 0 and history[-1]["restarts"] == 1
    _close(want["valid"], got["valid"])
    _close(want["test"], got["test"])


# ------------------------------------------------------------------------------ labeling
def test_a_labeling_worker_killed_partway_leaves_every_example_labelled_exactly_once(distilled, tmp_path, reliability):
    cfg = _fresh_run(distilled[0], tmp_path / "run", "prepare", "teacher")
    cfg = cfg.model_copy(update={"label": cfg.label.model_copy(update={
        "top_k": 5, "num_workers": 2, "cpus_per_worker": 0.5, "batch_size": 16, "rows_per_file": 16, "max_failures": 2})})
    out = tmp_path / "run" / "label"
    killer = Killer("RayTrainWorker", lambda: len(list(out.rglob("part-*.parquet"))) >= 6)
    killer.start()
    m = label.run(cfg, str(out))
    killer.stop.set()
    reliability["faults"] = int(killer.killed is not None)
    assert killer.killed, "no labeling worker was killed"
    # parts are named part-<attempt>-<rank>-...: the restarted workers wrote under new attempt ids
    # and skipped what the killed attempt had finished
    assert len({p.name.split("-")[1] for p in out.rglob("part-*.parquet")}) > 2
    prepared = json.loads((tmp_path / "run" / "prepare" / "manifest.json").read_text())["examples"]
    assert m["examples"] == prepared
    lost = 0
    for task in TASKS:
        ids = pq.read_table(out / task, columns=["example_id"]).column(0).to_pylist()
        want = pq.read_table(tmp_path / "run" / "prepare" / "examples" / task, columns=["example_id"]).column(0).to_pylist()
        assert len(ids) == len(set(ids)), f"{task}: duplicated labels"
        lost += len(set(want) - set(ids))
    reliability["rows_lost"] = lost
    assert lost == 0


# ------------------------------------------------------------------------------ Tune
def test_a_killed_tune_trial_is_reported_failed_and_the_sweep_finishes(distilled, tmp_path, reliability):
    from distillery.layout import TuneDir
    from ray import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    cfg = _fresh_run(distilled[0], tmp_path / "run", "prepare", "teacher", "label", "distill")
    out = tmp_path / "run" / "tune"
    first: list[Path] = []  # the first trial's Train run folder, pinned when it appears

    def first_trial_training() -> bool:
        """The first trial has a registered checkpoint and its loop has not finished (no history.json)."""
        if not first:
            runs = list((out / "ray_train").glob("trial-*"))
            if len(runs) != 1:
                return False
            first.append(runs[0])
        trial_id = first[0].name.removeprefix("trial-")
        return registered(first[0]) and not Path(TuneDir(str(out)).trial(trial_id).history).exists()

    # the first trial's own process, after its first epoch: Tune does not retry it (max_failures=0).
    # Checked again right before the kill, after the seconds the actor list takes: a trial killed
    # while its Train workers were still starting (the second one, once the first had finished)
    # leaked their placement group, and with it one of the session's two CPUs
    killer = Killer("ImplicitFunc", first_trial_training, delay=0.5,
                    confirm=lambda actors: len(actors) == 1 and first_trial_training())
    killer.start()
    try:
        m = dtune.run(cfg, str(out))
    finally:
        killer.stop.set()
        # a leak fails this test rather than starving a later one: Train's cleaner removes a
        # killed run's group within seconds, and nothing else holds one between tests
        deadline = time.time() + 60
        while (leaked := [g for g, t in placement_group_table().items() if t["state"] != "REMOVED"]) \
                and time.time() < deadline:
            time.sleep(0.5)
        for group_id in leaked:
            remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(group_id)))
    reliability["faults"] = int(killer.killed is not None)
    assert not leaked, f"placement groups left behind by the sweep: {leaked}"
    assert killer.killed, "no trial was killed"
    with (out / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and [r["status"] for r in rows].count("failed") == 1
    failed = next(r for r in rows if r["status"] == "failed")
    assert failed["defaults"] == "True" and int(failed["epochs_run"]) >= 1  # killed mid-training, not while starting
    assert m["counts"] == {"trials": 2, "failed": 1}
    assert (out / "best.json").exists()


# ------------------------------------------------------------------------------ Serve
def test_a_killed_serve_replica_under_steady_load_is_replaced(tiny_bundle, reliability):
    """Two replicas, four clients sending CTR requests back to back; one replica's process is
    killed. Measured: the requests that failed, and the seconds until two replicas serve again."""
    import requests
    from conftest import IDS, free_port
    from distillery.serving.app import AppArgs, build_app, wait_ready
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base, app = f"http://127.0.0.1:{port}", "faults"
    serve.run(build_app(AppArgs(bundle=tiny_bundle, replicas=2, model_cpus=0.3)), name=app, route_prefix="/",
              blocking=False)
    wait_ready(base, timeout_s=180)
    log, stop = [], threading.Event()

    def client(i):
        with requests.Session() as http:
            while not stop.is_set():
                try:
                    r = http.post(f"{base}/v1/ctr", json={"history": [IDS[i]], "candidates": IDS[i + 1:i + 4]}, timeout=30)
                    ok = r.status_code == 200 and len(r.json()["predictions"]) == 3
                except requests.RequestException:
                    ok = False
                log.append((time.time(), ok))  # when it ended: one in flight at the kill counts after it

    def replicas():
        return alive(f"ServeReplica:{app}:")

    try:
        clients = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(4)]
        for c in clients:
            c.start()
        deadline = time.time() + 60
        while len(replicas()) < 2 or sum(ok for _, ok in log) < 50:
            assert time.time() < deadline, "two replicas did not come up under load"
            time.sleep(0.2)
        victim = replicas()[0]
        os.kill(victim.pid, signal.SIGKILL)
        killed_at = time.time()
        reliability["faults"] = 1
        recovered_at = None
        while time.time() - killed_at < 120:
            now = [a for a in replicas() if a.actor_id != victim.actor_id]
            running = serve.status().applications[app].deployments["Endpoint"].replica_states.get("RUNNING", 0)
            if len(now) == 2 and running == 2:
                recovered_at = time.time()
                break
            time.sleep(0.2)
        time.sleep(3)  # steady load on the two replicas again
        stop.set()
        for c in clients:
            c.join(timeout=60)
    finally:
        stop.set()
        serve.delete(app)
        serve.shutdown()
    assert recovered_at, "the killed replica was not replaced within 120 s"
    after = [ok for t, ok in log if t >= killed_at]
    failed = after.count(False)
    reliability.update(recovery_s=round(recovered_at - killed_at, 2), failed_requests=failed,
                       requests_after_kill=len(after), requests=len(log))
    timeline = [(round(t - killed_at, 2), ok) for t, ok in log if not ok]
    assert all(ok for t, ok in log if t < killed_at), timeline  # nothing failed before the fault
    assert all(ok for t, ok in log if t >= recovered_at + 1), (recovered_at - killed_at, timeline)  # nor once repaired
    assert failed <= 0.1 * len(after), f"{failed} of {len(after)} requests failed after the kill"
