"""The frozen encoder's embedding of every item's text, computed once per run as a Ray task (on a
GPU when `teacher.use_gpu`) and kept at RUN_DIR/teacher/item_text.safetensors."""
from __future__ import annotations

import os
import tempfile
import time

import torch

from .. import storage
from ..config import RunConfig
from ..data.examples import read_items
from ..layout import RunLayout, TeacherDir
from ..models.teacher import load_backbone, load_weights, mean_pool, set_threads
from ..progress import say


def encode_items(model_name: str, texts: list[str], max_length: int, device: str = "cpu",
                 batch: int = 128) -> torch.Tensor:
    """[2 + len(texts), H] mean-pooled embeddings of the frozen encoder (rows 0, 1: zeros)."""
    backbone, tokenizer = load_backbone(model_name)
    backbone.to(device).eval()
    out = torch.zeros(len(texts) + 2, backbone.config.hidden_size)
    with torch.no_grad():
        for a in range(0, len(texts), batch):
            enc = tokenizer([t or "" for t in texts[a:a + batch]], padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt").to(device)
            h = backbone(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            out[2 + a:2 + a + len(h)] = mean_pool(h, enc["attention_mask"]).float().cpu()
    return out


def item_text_embeddings(cfg: RunConfig, out_dir: str) -> torch.Tensor:
    """The item text embeddings of this run: computed once, as a Ray task, and kept in out_dir."""
    import ray
    from safetensors.torch import save_file

    path = TeacherDir(out_dir).item_text
    if storage.exists(path):
        return load_weights(path)["item_text"]
    texts = read_items(RunLayout(cfg.run_dir).prepare.root)["text"].tolist()
    t0 = time.perf_counter()
    task = ray.remote(num_cpus=cfg.teacher.cpus_per_worker, num_gpus=1 if cfg.teacher.use_gpu else 0)(_encode_task)
    emb = ray.get(task.remote(cfg.teacher.model, texts, cfg.teacher.max_length, cfg.teacher.use_gpu,
                              cfg.teacher.cpus_per_worker))
    with tempfile.TemporaryDirectory() as tmp:
        save_file({"item_text": emb.contiguous()}, os.path.join(tmp, "e.safetensors"))
        storage.upload_file(os.path.join(tmp, "e.safetensors"), path)
    say(f"[teacher] item text: {len(texts):,} items embedded by the frozen encoder in {time.perf_counter() - t0:.0f}s")
    return emb


def _encode_task(model_name: str, texts: list[str], max_length: int, use_gpu: bool, cpus: float) -> torch.Tensor:
    set_threads(cpus)
    return encode_items(model_name, texts, max_length, "cuda" if use_gpu else "cpu")
