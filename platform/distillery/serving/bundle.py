"""The model bundle: the one folder a served student is loaded from.

    model.safetensors   the weights (float32, or 8-bit row-wise: `quant.py`); never pickle
    config.json         "spec": the student's shape (`StudentSpec`); the weights' format; provenance
    tokenizer files     the teacher tokenizer the text bag indexes
    items.parquet       the catalogue in vocabulary order: idx, item_id, title, category, clicks
    metrics.json        validation and test metrics, and the teacher's, for the model card
    manifest.json       sha256 and size of every other file

`verify` recomputes the manifest and names each file that is missing, altered or unlisted;
`load` always verifies first. A bundle is written to a temporary folder and moved into place, so
a reader never sees half of one.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
from typing import NamedTuple

import torch

from .. import __version__, quant, storage
from ..errors import DistilleryError
from ..layout import RunLayout
from ..models import student as S
from ..models.student import StudentSpec

MANIFEST = "manifest.json"
FORMAT = 2  # 2: config.json holds the student's shape under "spec" (a StudentSpec); 1: its keys at the top level
REQUIRED = ("model.safetensors", "config.json", "items.parquet", "metrics.json", "tokenizer.json")


class BundleError(DistilleryError):
    """A bundle that is incomplete, altered or unreadable."""


def _files(folder: str) -> list[str]:
    out = []
    for root, _, names in os.walk(folder):
        out += [os.path.relpath(os.path.join(root, n), folder).replace(os.sep, "/") for n in names]
    return sorted(f for f in out if f != MANIFEST)


def write(out: str, *, state: dict[str, torch.Tensor], config: dict, tokenizer, items, metrics: dict) -> dict:
    """Write a bundle to `out` (path or URI), replacing what was there; returns its manifest.
    `items` is a pyarrow Table of the catalogue in vocabulary order."""
    import pyarrow.parquet as pq
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "distillery-student", "weights": config["weights"]})
        tokenizer.save_pretrained(tmp)
        pq.write_table(items, os.path.join(tmp, "items.parquet"))
        for name, obj in (("config.json", config), ("metrics.json", metrics)):
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(obj, f, indent=1)
        manifest = {"format": FORMAT, "distillery_version": __version__,
                    "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "files": {f: {"sha256": storage.sha256(os.path.join(tmp, f)), "bytes": os.path.getsize(os.path.join(tmp, f))}
                              for f in _files(tmp)}}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        storage.upload_dir(tmp, out)
    return manifest


def problems(folder: str) -> list[str]:
    """Everything wrong with the local bundle `folder`, one line per file ([] = good)."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isdir(folder):
        return [f"{folder}: not a folder"]
    if not os.path.isfile(path):
        return [f"{path}: missing (not a bundle, or an incomplete copy)"]
    try:
        listed = json.load(open(path))["files"]
        if not (isinstance(listed, dict) and all(isinstance(w, dict) and isinstance(w.get("bytes"), int)
                                                 and isinstance(w.get("sha256"), str) for w in listed.values())):
            raise TypeError('"files" is not {name: {"sha256": ..., "bytes": ...}}')
    except (ValueError, KeyError, TypeError) as exc:
        return [f"{path}: unreadable ({exc}): re-export the bundle from its run or rebuild it"]
    out = []
    for name in REQUIRED:
        if name not in listed:
            out.append(f"{name}: required but not in the manifest")
    for name, want in sorted(listed.items()):
        f = os.path.join(folder, name)
        if not os.path.isfile(f):
            out.append(f"{name}: missing")
        elif os.path.getsize(f) != want["bytes"] or storage.sha256(f) != want["sha256"]:
            out.append(f"{name}: altered (sha256 does not match the manifest)")
    for name in _files(folder):
        if name not in listed:
            out.append(f"{name}: not in the manifest (added after the bundle was written)")
    return out


def verify(path: str) -> dict:
    """The manifest of a good bundle (path or URI); BundleError naming every bad file otherwise."""
    with storage.local_copy(path) as local:
        bad = problems(local)
        if bad:
            raise BundleError(f"bundle {path} failed verification:\n  " + "\n  ".join(bad)
                              + "\nRe-export it from its run (distillery export RUN_DIR OUT) or rebuild it.")
        return json.load(open(os.path.join(local, MANIFEST)))


class Loaded(NamedTuple):
    model: torch.nn.Module
    tokenizer: object
    spec: StudentSpec
    config: dict  # config.json: the spec, the weights' format, variant, source, run_dir, student_dir
    items: object  # pandas DataFrame of items.parquet
    manifest: dict
    metrics: dict


def load(path: str) -> Loaded:
    """The student, tokenizer, spec, config, catalogue, manifest and metrics of a verified bundle."""
    import pandas as pd
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    with storage.local_copy(path) as local:
        bad = problems(local)
        if bad:
            raise BundleError(f"bundle {path} failed verification:\n  " + "\n  ".join(bad))
        manifest = json.load(open(os.path.join(local, MANIFEST)))
        config = json.load(open(os.path.join(local, "config.json")))
        state = quant.dequantize_state(load_file(os.path.join(local, "model.safetensors")))
        tokenizer = AutoTokenizer.from_pretrained(local)
        items = pd.read_parquet(os.path.join(local, "items.parquet"))
        metrics = json.load(open(os.path.join(local, "metrics.json")))
    if "spec" not in config:
        raise BundleError(f"bundle {path}: config.json has no student spec (a bundle of an older distillery): "
                          "re-export it from its run with this version (distillery run CONFIG --stages compress)")
    spec = StudentSpec.from_json(config["spec"], f"bundle {path}: config.json: spec")
    return Loaded(S.from_state(spec, state).eval(), tokenizer, spec, config, items, manifest, metrics)


def export(run_dir: str, out: str) -> dict:
    """Copy RUN_DIR/bundle to `out`, verified before and after. `out` is replaced, so it must be
    new, empty or an earlier bundle, and not the run directory, a folder above it or its bundle."""
    src = RunLayout(run_dir).bundle
    if not storage.exists(storage.join(src, MANIFEST)):
        raise BundleError(f"{src} has no bundle: run the compress stage first (distillery run CONFIG --stages compress)")
    _check_export_target(run_dir, src, out)
    verify(src)
    storage.copy_dir(src, out)
    return verify(out)


def _check_export_target(run_dir: str, src: str, out: str) -> None:
    run, bundle, dest = (storage.absolute(x).rstrip("/") for x in (run_dir, src, out))
    if run == dest or run.startswith(dest + "/") or dest == bundle:
        raise BundleError(f"export OUT {out} is the run directory {run_dir}, a folder above it or its own bundle, "
                          "and export replaces OUT: choose another folder")
    if storage.holds_anything(out) and not storage.exists(storage.join(out, MANIFEST)):
        raise BundleError(f"export OUT {out} exists and is not a bundle (no {MANIFEST}), and export replaces "
                          "OUT: choose a new or empty folder, or an earlier bundle to overwrite")
