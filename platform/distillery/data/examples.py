"""Example building blocks from validated rows (docs/data.md, "Task examples"): vocabulary lookups,
negative sampling, text normalization and hashing, and the text-class examples; the per-user
recommendation and CTR pass is `tasks.user_examples`.

intent          (normalized text, category at `category_level`) pairs from search queries (label =
                the clicked item's category), item titles and review titles. Identical texts are
                merged (majority label); the split is a hash of the text, so a text never crosses
                splits. Classes with fewer than `min_class_count` texts become "other".

Item and category ids are vocabulary indices with 0 = padding and 1 = unknown.
"""
from __future__ import annotations

import hashlib
import unicodedata

import numpy as np
import pandas as pd
import pyarrow as pa

PAD, UNK = 0, 1
RESERVED = ["[PAD]", "[UNK]"]
SPLITS = ("train", "valid", "test")
TRANSFER = "transfer"  # intent texts with no gold label, made from train texts for distillation
ALL_SPLITS = SPLITS + (TRANSFER,)
OTHER = "other"

EXAMPLE_SCHEMA = pa.schema([
    ("task", pa.string()), ("split", pa.string()), ("example_id", pa.string()), ("user_id", pa.string()),
    ("history", pa.list_(pa.int32())), ("item", pa.int32()), ("label", pa.int8()), ("slot", pa.int32()),
    ("impression_id", pa.string()),
])
INTENT_SCHEMA = pa.schema([
    ("example_id", pa.string()), ("text", pa.string()), ("label", pa.int32()), ("label_name", pa.string()),
    ("split", pa.string()), ("count", pa.int32()),
])


def lookup(sorted_ids: np.ndarray, ids) -> np.ndarray:
    """Vocabulary index of each id (vocab = RESERVED + sorted ids); UNK when absent."""
    ids = np.asarray(ids, dtype=object)
    if len(sorted_ids) == 0:
        return np.full(len(ids), UNK, dtype=np.int32)
    pos = np.searchsorted(sorted_ids, ids)
    pos_c = np.minimum(pos, len(sorted_ids) - 1)
    found = sorted_ids[pos_c] == ids
    return np.where(found, pos_c + len(RESERVED), UNK).astype(np.int32)


def sample_negatives(rng, cdf: np.ndarray, exclude: set, k: int) -> list[int]:
    """k distinct vocabulary indices drawn ~ cdf, none in `exclude`. cdf[i] covers index i + 2."""
    picked: list[int] = []
    for _ in range(20):
        draws = np.searchsorted(cdf, rng.random(4 * k + 8), side="right") + len(RESERVED)
        for d in draws.tolist():
            if d not in exclude and d not in picked and d - len(RESERVED) < len(cdf):
                picked.append(d)
                if len(picked) == k:
                    return picked
    return picked  # catalogue almost fully clicked by this user: fewer negatives


def negative_cdf(counts: np.ndarray, alpha: float) -> np.ndarray:
    """Sampling CDF over catalogue order from click counts; unclicked items get a count of 1."""
    w = np.power(np.maximum(counts.astype(float), 1.0), alpha)
    return np.cumsum(w) / w.sum()


# ------------------------------------------------------------------------------ intent
def normalize_text(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def text_or_none(value) -> str | None:
    """A present, non-blank string, else None. Optional catalogue columns are read through this,
    never by truthiness: pandas 3 reads a missing string as NaN, which is truthy and not a str."""
    return value if isinstance(value, str) and value.strip() else None


def category_at(path, level: int) -> str | None:
    """The first `level` parts of a " > " path; None for a missing category."""
    path = text_or_none(path)
    return None if path is None else " > ".join(path.split(" > ")[:level])


def text_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big")


def split_of_text(text: str, fractions=(0.8, 0.1, 0.1)) -> str:
    u = text_hash(text) / 2**64
    return "train" if u < fractions[0] else "valid" if u < fractions[0] + fractions[1] else "test"


def intent_pairs(batch: pd.DataFrame, *, text_col: str, item_ids: np.ndarray, item_labels: np.ndarray) -> pd.DataFrame:
    """(text, label) for rows with a non-blank text. `label` is None where the item has no category:
    such a text is no intent example, and the caller counts it as left out for that reason."""
    texts = [text_or_none(t) for t in batch[text_col].astype(object)]
    idx = lookup(item_ids, batch["item_id"].to_numpy(dtype=object)) - len(RESERVED)
    labels = [item_labels[i] if i >= 0 else None for i in idx.tolist()]
    out = pd.DataFrame({"text": [normalize_text(t) if t is not None else None for t in texts],
                        "label": pd.Series(labels, dtype=object)})
    keep = out["text"].notna() & (out["text"] != "")
    return out[keep].reset_index(drop=True)


def intent_examples(pair_counts: pd.DataFrame, *, min_class_count: int, fractions, prefix: str,
                    classes: list[str] | None = None) -> tuple[pd.DataFrame, list[str]]:
    """From (text, label, count) rows: one example per text with its majority label, its id
    `prefix:<hash of the text>` (the task's name).

    Ties go to the alphabetically first label, so the result does not depend on row order.
    With `classes` (a warm start keeps the earlier run's, which its teacher was trained on), those
    are the classes, none is merged for being rare here, and a label outside them becomes "other";
    when "other" is not among them, such texts get no example (the caller counts them).
    """
    if pair_counts.empty:
        return pd.DataFrame(columns=[f.name for f in INTENT_SCHEMA]), list(classes or [])
    pc = pair_counts.sort_values(["text", "count", "label"], ascending=[True, False, True])
    total = pc.groupby("text", sort=False)["count"].sum()
    best = pc.drop_duplicates("text", keep="first").set_index("text")
    ex = pd.DataFrame({"text": best.index, "label_name": best["label"].to_numpy(),
                       "count": total.loc[best.index].to_numpy()})
    if classes is not None:
        names = list(classes)
        ex.loc[~ex["label_name"].isin(names), "label_name"] = OTHER
        ex = ex[ex["label_name"].isin(names)].reset_index(drop=True)
    else:
        per_class = ex["label_name"].value_counts()
        rare = set(per_class[per_class < min_class_count].index)
        ex.loc[ex["label_name"].isin(rare), "label_name"] = OTHER
        names = sorted(set(ex["label_name"]) - {OTHER}) + ([OTHER] if OTHER in set(ex["label_name"]) else [])
    ex["label"] = ex["label_name"].map({n: i for i, n in enumerate(names)}).astype(np.int32)
    ex["split"] = [split_of_text(t, fractions) for t in ex["text"]]
    ex["example_id"] = [f"{prefix}:{text_hash(t):016x}" for t in ex["text"]]
    ex["count"] = ex["count"].astype(np.int32)
    return ex[[f.name for f in INTENT_SCHEMA]].sort_values("example_id").reset_index(drop=True), names


def transfer_texts(train_texts: list[str], exclude: set[str], variants: int) -> list[str]:
    """Up to `variants` new texts per train text for the student to learn the teacher's intent
    from (Tang et al., 2019, "Distilling task-specific knowledge from BERT into simple neural
    networks": the student sees far more of the teacher's function than the gold texts show).
    Half are random subsets of the words (each kept with p=1/2, order kept), half contiguous spans,
    both of at least one word: the short, partial texts shoppers type. Seeded by the text itself, so
    the same data gives the same texts. Only train texts are varied, and a variant equal to any text
    in `exclude` (every intent text of every split) is dropped: nothing of valid or test leaks in."""
    out: list[str] = []
    seen = set(exclude)
    for text in train_texts:
        words = text.split()
        if len(words) < 2:
            continue
        rng = np.random.default_rng(text_hash(text))
        for v in range(variants):
            if v % 2 == 0:
                keep = rng.random(len(words)) < 0.5
                if not keep.any():
                    keep[rng.integers(len(words))] = True
                cand = " ".join(w for w, k in zip(words, keep) if k)
            else:
                n = int(rng.integers(1, len(words)))
                a = int(rng.integers(0, len(words) - n + 1))
                cand = " ".join(words[a:a + n])
            if cand not in seen:
                seen.add(cand)
                out.append(cand)
    return out


def transfer_examples(texts: list[str]) -> pd.DataFrame:
    """INTENT_SCHEMA rows of the transfer split: no gold label (-1)."""
    ex = pd.DataFrame({"text": texts, "label": np.full(len(texts), -1, dtype=np.int32), "label_name": None,
                       "split": TRANSFER, "count": np.ones(len(texts), dtype=np.int32)})
    ex["example_id"] = [f"intent-x:{text_hash(t):016x}" for t in texts]
    return ex[[f.name for f in INTENT_SCHEMA]].sort_values("example_id").reset_index(drop=True)


# ------------------------------------------------------------------------------ reading back
def read_split(prepare_dir: str, task: str, split: str) -> pd.DataFrame:
    """One task/split of the prepare stage's examples as a DataFrame (small-data and eval path)."""
    import pyarrow.parquet as pq

    from .. import storage
    from ..layout import PrepareDir

    fs, path = storage.resolve(PrepareDir(prepare_dir).examples(task, split))
    return pq.read_table(path, filesystem=fs).to_pandas()


def read_items(prepare_dir: str) -> pd.DataFrame:
    """The catalogue in vocabulary order (row i has vocabulary id i + 2)."""
    import pyarrow.parquet as pq

    from .. import storage
    from ..layout import PrepareDir

    fs, path = storage.resolve(PrepareDir(prepare_dir).items)
    return pq.read_table(path, filesystem=fs).to_pandas()


def vocab_size(prepare_dir: str) -> int:
    """Item vocabulary size, reserved ids included."""
    import pyarrow.parquet as pq

    from .. import storage
    from ..layout import PrepareDir

    fs, path = storage.resolve(PrepareDir(prepare_dir).items)
    return pq.read_metadata(path, filesystem=fs).num_rows + len(RESERVED)
