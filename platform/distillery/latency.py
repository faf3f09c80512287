"""CPU latency and throughput of the teacher and the students, measured alike (the report and
compress stages time with it).

Latency: one request = one example of every task (a user's history scored against the whole
catalogue, one CTR candidate, one shopping text), tokenization and input tensors included, item
vectors cached as a server would. The teacher's per-task functions run as frozen TorchScript traces
(`_traced`), the students through `runtime.StudentRuntime`, the code that serves them. All models
are timed in this one process on one thread (a Serve replica's CPU), interleaved in blocks of 20
requests in a shuffled order of models, so machine noise hits them alike and each runs warm, as on
its own replica. Throughput is requests per second at batch 1 (1000 / mean latency) and at batch 256.
"""
from __future__ import annotations

import statistics
import time
from types import SimpleNamespace

import numpy as np
import torch

from .data.examples import read_split
from .models.student import StudentSpec
from .models.teacher import text_inputs
from .serving.runtime import StudentRuntime, pad
from .tasks import TASKS


def requests(prepare_dir: str, tasks, n: int, seed: int) -> list[dict]:
    """n requests drawn from the test split, each {task: its payload (`Task.probe_request`)} with one
    example of every task."""
    rng = np.random.default_rng(seed)
    frames = {t: read_split(prepare_dir, t, "test") for t in tasks}
    rows = {t: df.iloc[rng.integers(0, len(df), n)] for t, df in frames.items() if len(df)}
    return [{t: TASKS[t].probe_request(r.iloc[i]) for t, r in rows.items()} for i in range(n)]


def _server(model):
    """serve(requests) -> seconds per task; inputs are built inside the timed part, as a server
    would. `model`: what the tasks' probes call (`Task.probe`): `histories(id lists, length)`,
    `rec_history`, `ctr_history`, `rec_scores`, `ctr_logits` and `text_logits(task, texts)`."""
    def serve(reqs: list[dict]) -> dict[str, float]:
        took = {}
        for t in reqs[0]:
            t0 = time.perf_counter()
            TASKS[t].probe(model, [r[t] for r in reqs])
            took[t] = time.perf_counter() - t0
        return took
    return serve


class _Call(torch.nn.Module):
    """fn(model, *inputs) as a module, so that its trace can be frozen."""

    def __init__(self, model: torch.nn.Module, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, *inputs):
        return self.fn(self.model, *inputs)


def _traced(model: torch.nn.Module, fn, *example):
    """fn(model, *inputs) as a frozen TorchScript trace: eager PyTorch spends ~10 us of Python
    dispatch per op on this CPU, most of a small model's time at batch 1. Teacher and students are
    all timed this way, as a CPU server would run them."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python values baked into the graph
        return torch.jit.freeze(torch.jit.trace(_Call(model, fn).eval(), example, check_trace=False))


def _heads(model, items, rec_history: int, ctr_history: int):
    h_rec, h_ctr = torch.zeros(2, rec_history, dtype=torch.long), torch.zeros(2, ctr_history, dtype=torch.long)
    h_rec[:, -1] = h_ctr[:, -1] = 2
    two = torch.tensor([2, 3])
    rec = _traced(model, lambda m, h: m.rec_scores(h, items), h_rec)
    ctr = _traced(model, lambda m, h, i, s: m.ctr_logits(h, i, s, items), h_ctr, two, torch.tensor([-1, 0]))
    return rec, ctr


@torch.inference_mode()
def teacher_server(model, tokenizer, max_length: int, ctr_history: int):
    model.eval().requires_grad_(False)  # a trace keeps the weights as constants
    items = model.item_vectors()
    rec_history = model.max_history
    rec, ctr = _heads(model, items, rec_history, ctr_history) if len(model.members) else (None, None)

    def inputs(texts):
        return tuple(text_inputs(tokenizer, texts, max_length=max_length, buckets=model.lexical_buckets).values())

    example = inputs(["red gel pen", "a longer query about chairs"])
    classify = {task: _traced(model, lambda m, *x, task=task: m.class_logits(task, *x), *example)
                for task in model.classifiers}
    return _server(SimpleNamespace(rec_scores=rec, ctr_logits=ctr, rec_history=rec_history, ctr_history=ctr_history,
                                   histories=pad, text_logits=lambda task, texts: classify[task](*inputs(texts))))


def student_server(model, tokenizer, spec: StudentSpec):
    """The student as served: `runtime.StudentRuntime` (item and text products folded at load)."""
    return _server(StudentRuntime(model, tokenizer, spec))


@torch.inference_mode()
def measure_latency(servers: dict, requests: list[dict], *, repeats_256: int = 3, warmup: int = 10,
                    block: int = 20) -> dict:
    """{name: {"cpu_latency_ms": {p50, p99}, "cpu_latency_ms_by_task": {task: p50},
    "cpu_throughput": {batch1, batch256}}}; interleaved in blocks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = {name: [] for name in servers}
        for r in requests[:warmup]:
            for serve in servers.values():
                serve([r])
        # Blocks of `block` requests per model, the models in a fresh order every round: drift on a
        # noisy machine hits all alike, and each model runs warm as on its own replica rather than
        # right after another model has swept the caches (that cost the students ~0.1 ms a request).
        rng = np.random.default_rng(0)
        for a in range(0, len(requests), block):
            for name in rng.permutation(list(servers)):
                for r in requests[a:a + block]:
                    times[name].append({t: s * 1000 for t, s in servers[name]([r]).items()})
        big = (requests * (256 // len(requests) + 1))[:256]
        t256 = {name: [] for name in servers}
        for _ in range(repeats_256):
            for name, serve in servers.items():
                t256[name].append(sum(serve(big).values()))
    finally:
        torch.set_num_threads(threads)
    out = {}
    for name, per_request in times.items():
        total = [sum(r.values()) for r in per_request]
        out[name] = {"cpu_latency_ms": {"p50": float(np.percentile(total, 50)), "p99": float(np.percentile(total, 99))},
                     "cpu_latency_ms_by_task": {t: float(np.median([r[t] for r in per_request])) for t in per_request[0]},
                     "cpu_throughput": {"batch1": 1000.0 / float(np.mean(total)),
                                        "batch256": 256 / statistics.median(t256[name])}}
    return out


# ------------------------------------------------------------------------------ the stage
