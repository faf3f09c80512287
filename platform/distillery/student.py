"""Student model i/o and its predictor functions (`evaluation.evaluate`, the report, serving).

A saved student is a folder: `model.safetensors` (never pickle), `student.json` (sizes, intent
labels, text settings) and the teacher's tokenizer files, which the text bag indexes.
"""
from __future__ import annotations

import json
import os
import tempfile

import torch

from . import evaluation, storage
from .config import RunConfig
from .data.examples import read_items, vocab_size
from .layout import RunLayout
from .student_model import Student, text_bag


def student_meta(cfg: RunConfig, prepare_dir: str, tokenizer) -> dict:
    teacher_meta = storage.read_json(RunLayout(cfg.run_dir).teacher.spec)
    sc = cfg.student
    return {"n_items": vocab_size(prepare_dir), "n_categories": teacher_meta["n_categories"],
            "n_intents": teacher_meta["n_intents"], "intent_labels": teacher_meta["intent_labels"],
            "vocab_size": tokenizer.vocab_size, "dim": sc.dim, "text_dim": sc.text_dim,
            "ngram_buckets": sc.ngram_buckets, "heads": sc.heads, "layers": sc.layers, "dropout": sc.dropout,
            "max_history": cfg.tasks.recommendation.max_history, "ctr_history": cfg.tasks.ctr.max_history,
            "max_length": cfg.teacher.max_length,
            "tasks": list(cfg.tasks.enabled())}


def build(meta: dict, item_category: torch.Tensor | None = None, item_texts: list[str] | None = None,
          tokenizer=None) -> Student:
    """A fresh student; with `item_texts` (vocabulary order, from id 2) the item bags are built from
    them, otherwise they are placeholders that `load_state_dict` fills. The compressed shapes
    (`shrink.py`) are meta keys a distilled student does not have: `ctr_hidden`, `intent_hidden`
    (default `dim`), `text_rows_kept` (default: the whole table) and `item_text` (default true)."""
    n = meta["n_items"]
    if item_texts is not None:
        ids, offsets = text_bag(tokenizer, ["", ""] + list(item_texts), max_length=meta["max_length"],
                                buckets=meta["ngram_buckets"])
    else:
        ids, offsets = torch.zeros(0, dtype=torch.long), torch.zeros(n, dtype=torch.long)
    kept = meta.get("text_rows_kept")
    return Student(vocab_size=meta["vocab_size"], n_items=n, n_categories=meta["n_categories"],
                   n_intents=meta["n_intents"],
                   item_category=item_category if item_category is not None else torch.zeros(n, dtype=torch.long),
                   item_bag_ids=ids, item_bag_offsets=offsets, dim=meta["dim"], text_dim=meta["text_dim"],
                   ngram_buckets=meta["ngram_buckets"], heads=meta["heads"],
                   max_history=max(meta["max_history"], meta.get("ctr_history", 0)),
                   history_layers=meta["layers"], dropout=meta["dropout"], ctr_hidden=meta.get("ctr_hidden"),
                   intent_hidden=meta.get("intent_hidden"),
                   text_rows=None if kept is None else torch.arange(kept), item_text=meta.get("item_text", True))


def from_state(meta: dict, state: dict[str, torch.Tensor]) -> Student:
    """The student of `meta` holding `state` (float tensors): the catalogue-sized buffers take the
    state's sizes."""
    model = build(meta)
    for name, _ in list(model.named_buffers()):
        if name in state and "." not in name:
            setattr(model, name, torch.empty_like(state[name]))
    model.load_state_dict(state)
    return model


def build_for_run(meta: dict, prepare_dir: str, tokenizer) -> Student:
    items = read_items(prepare_dir)
    category = torch.tensor([0, 1] + items["category_idx"].tolist(), dtype=torch.long)
    return build(meta, category, items["text"].tolist(), tokenizer)


def teacher_vectors(teacher_dir: str) -> dict[str, torch.Tensor]:
    """What a KD student starts from: the teacher's word-piece input embeddings [vocab, H] and its
    (first member's) item vectors [n_items, D], read from the saved teacher's weights."""
    from safetensors.torch import load_file

    from .seqrec import SeqSpec, SequenceModel

    with storage.local_copy(teacher_dir) as local:
        meta = json.load(open(os.path.join(local, "teacher.json")))
        state = load_file(os.path.join(local, "model.safetensors"))
    out = {}
    words = [k for k in state if k.startswith("intent.backbone.") and k.endswith("word_embeddings.weight")]
    if words:
        out["word_pieces"] = state[words[0]].float()
    if meta.get("members"):
        seq = SequenceModel(SeqSpec.from_json(meta["sequence"]))
        seq.load_state_dict({k[len("members.0.seq."):]: v for k, v in state.items() if k.startswith("members.0.seq.")})
        with torch.no_grad():
            out["items"] = seq.item_vectors().float()
    return out


def _project(x: torch.Tensor, width: int) -> torch.Tensor:
    """Rows of x [N, H] in `width` dimensions by a truncated SVD (x ~ U S V^T -> U S, uncentered, so
    dot products between rows are kept as well as `width` dimensions can); zero-padded when H < width."""
    if x.shape[1] <= width:
        return torch.nn.functional.pad(x, (0, width - x.shape[1]))
    u, sv, _ = torch.linalg.svd(x.double(), full_matrices=False)
    k = min(width, len(sv))
    return torch.nn.functional.pad((u[:, :k] * sv[:k]).float(), (0, width - k))


@torch.no_grad()
def init_from_teacher(model: Student, vectors: dict[str, torch.Tensor]) -> None:
    """Start the student's item table from the teacher's item vectors and the word-piece rows of its
    text table from the teacher's word-piece embeddings, each projected to the student's width.
    The text rows are rescaled to the table's initial spread (the n-gram rows keep their random
    start); the item rows keep the teacher's scale, which its dot products were trained at."""
    if "items" in vectors and vectors["items"].shape[0] == model.item.weight.shape[0]:
        model.item.weight.copy_(_project(vectors["items"], model.item.weight.shape[1]))
    if "word_pieces" in vectors:
        words = _project(vectors["word_pieces"], model.text.weight.shape[1])
        n = min(len(words), model.vocab_size)
        rows = model.text.weight[:n]
        rows.copy_(words[:n] * (model.text.weight[model.vocab_size:].std() / words[:n].std().clamp(min=1e-12)
                                if model.ngram_buckets else 0.1 / words[:n].std().clamp(min=1e-12)))


def save(model: Student, tokenizer, meta: dict, out: str) -> None:
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
                  os.path.join(tmp, "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "student.json"), "w") as f:
            json.dump(meta, f)
        storage.upload_dir(tmp, out)


def load(path: str) -> tuple[Student, object, dict]:
    """(student in eval mode, tokenizer, meta). The item bags' sizes come from the weights file."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    with storage.local_copy(path) as local:
        meta = json.load(open(os.path.join(local, "student.json")))
        state = load_file(os.path.join(local, "model.safetensors"))
        tokenizer = AutoTokenizer.from_pretrained(local)
    return from_state(meta, state).eval(), tokenizer, meta


def predictors(model: Student, tokenizer, meta: dict, tasks, device="cpu") -> dict:
    """The student as `evaluation.evaluate`'s predictor functions (item vectors computed once)."""
    model.eval()
    with torch.no_grad():
        items = model.item_vectors()

    def intent(texts):
        ids, offsets = text_bag(tokenizer, texts, max_length=meta["max_length"], buckets=meta["ngram_buckets"])
        return model.intent_logits(ids.to(device), offsets.to(device)).argmax(-1).cpu().numpy()

    return {t: f for t, f in {**evaluation.item_head_predictors(model, items, device), "intent": intent}.items()
            if t in tasks}
