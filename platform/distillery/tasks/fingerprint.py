"""Fingerprints of what the teacher sees of an example: the label stage's cache key per example
(a warm-started run copies the labels of fingerprints an earlier teacher already labelled)."""
from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def of_histories(tag: str, batch: pa.Table, slots: bool) -> pa.Array:
    """[B] int64 from each example's history, item and (with `slots`) slot, under the task's `tag`."""
    n = batch.num_rows
    hist = batch.column("history")
    hist = hist.combine_chunks() if isinstance(hist, pa.ChunkedArray) else hist
    offsets = hist.offsets.to_numpy().astype(np.int64)
    offsets -= offsets[0]  # a sliced list array keeps its parent's offsets
    values = pc.list_flatten(hist).to_numpy(zero_copy_only=False).astype("<i4").tobytes()
    item = batch.column("item").to_numpy(zero_copy_only=False).astype("<i4")
    slot = (pc.fill_null(batch.column("slot"), -1).to_numpy(zero_copy_only=False).astype("<i4") if slots
            else np.full(n, -1, "<i4"))
    prefix = tag.encode() + b"\0"
    return pa.array([hash64(prefix + item[i].tobytes() + slot[i].tobytes() + values[4 * offsets[i]:4 * offsets[i + 1]])
                     for i in range(n)], pa.int64())


def of_texts(tag: str, texts: list) -> pa.Array:
    """[B] int64 from each text (None counts as empty), under the task's `tag`."""
    prefix = tag.encode() + b"\0"
    return pa.array([hash64(prefix + (t or "").encode("utf-8", "surrogatepass")) for t in texts], pa.int64())
