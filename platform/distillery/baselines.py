"""Non-neural baselines every model must beat, on the prepare stage's examples.

- popularity ranking: rank items by how often they were clicked before the evaluated split
  (counted from that split's histories, so the targets themselves never leak in).
- popularity CTR: smoothed item click-through rate from the train examples,
  (clicks_i + m * prior) / (shown_i + m), with the global rate as prior; unseen items get the prior.
- TF-IDF + LR for text classes: word 1-2-gram TF-IDF + multinomial logistic regression on train.

Each takes the task whose examples it reads; the task modules (`tasks/`) say which baselines they have.
"""
from __future__ import annotations

import numpy as np

from . import metrics as M
from .data.examples import read_split, vocab_size

SMOOTHING = 20.0  # pseudo-impressions behind the CTR prior


def _histories(df) -> list[np.ndarray]:
    return [np.asarray(h, dtype=np.int64) for h in df["history"]]


def popularity_ranking(prepare_dir: str, task: str, split: str = "test", seed: int = 0, batch: int = 1024) -> dict:
    """Ranking metrics of the popularity order on `task`'s next-item examples (history, item)."""
    df = read_split(prepare_dir, task, split)
    v = vocab_size(prepare_dir)
    hists = _histories(df)
    counts = np.bincount(np.concatenate(hists) if hists else np.zeros(0, np.int64), minlength=v).astype(np.float64)
    targets = df["item"].to_numpy(np.int64)
    return M.evaluate_ranking(lambda a, b: np.broadcast_to(counts, (b - a, v)), targets, hists, v, seed, batch)


def popularity_ctr(prepare_dir: str, task: str, split: str = "test") -> dict:
    """CTR metrics of the smoothed item click rate on `task`'s (item, label, user_id) examples."""
    train = read_split(prepare_dir, task, "train")
    v = vocab_size(prepare_dir)
    shown = np.bincount(train["item"].to_numpy(np.int64), minlength=v).astype(np.float64)
    clicks = np.bincount(train["item"].to_numpy(np.int64), weights=train["label"].to_numpy(np.float64), minlength=v)
    prior = float(train["label"].mean()) if len(train) else 0.5
    rate = (clicks + SMOOTHING * prior) / (shown + SMOOTHING)
    df = read_split(prepare_dir, task, split)
    return M.ctr_metrics(df["label"].to_numpy(), rate[df["item"].to_numpy(np.int64)], df["user_id"].to_numpy())


def tfidf_classifier(prepare_dir: str, task: str, split: str = "test", seed: int = 0) -> dict:
    """Classification metrics of TF-IDF + logistic regression on `task`'s (text, label) examples."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    train, df = read_split(prepare_dir, task, "train"), read_split(prepare_dir, task, split)
    if train["label"].nunique() < 2:
        pred = np.full(len(df), train["label"].iloc[0] if len(train) else 0)
        return M.classification_metrics(df["label"].to_numpy(), pred)
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    clf = LogisticRegression(max_iter=2000, C=10.0, random_state=seed)
    clf.fit(vec.fit_transform(train["text"]), train["label"])
    return M.classification_metrics(df["label"].to_numpy(), clf.predict(vec.transform(df["text"])))

