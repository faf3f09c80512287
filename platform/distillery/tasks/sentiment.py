"""Review sentiment: whether a shopper's review is negative, neutral or positive, read from its title
and text (the customer-service side: route the unhappy ones first).

Examples come from the reviews (`data.reviews`): text = "title. text", class from the star rating
(at most `tasks.sentiment.negative_max`: negative; at least `positive_min`: positive; neutral
between). Identical texts merge (majority class) and the split is a hash of the text, so a text
never crosses splits. A review without a rating or without any text is left out and counted.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from ..data import examples as ex
from ..data.tables import count_rows
from ..errors import DataError
from .base import Prepared, PrepareInputs
from .text import PAIR_SCHEMA, TextClassification

CLASSES = ("negative", "neutral", "positive")


class Sentiment(TextClassification):
    name = "sentiment"
    summary = "whether shoppers' reviews are negative, neutral or positive"
    demo_texts = ("Excellent, easy to set up and great value for the money.",
                  "Very disappointed: it broke after a week and customer service never answered.")

    def prepare(self, inputs: PrepareInputs) -> Prepared:
        task = self.settings(inputs.cfg)
        if inputs.reviews is None:
            raise DataError("tasks.sentiment learns from reviews with a rating and a text, and this run has none: "
                            "set data.reviews=PATH, or tasks.sentiment.enabled=false")
        rows = inputs.reviews.count()
        pairs = count_rows(inputs.reviews.map_batches(review_pairs, fn_kwargs={"negative_max": task.negative_max,
                                                                             "positive_min": task.positive_min},
                                                      batch_format="pandas"), ["text", "label"])
        labelled = pairs[pairs["label"].notna()]
        # classes fixed in this order, whatever the data holds: class ids mean the same in every run
        df, _ = ex.intent_examples(labelled, min_class_count=1, fractions=task.split_fractions, prefix=self.name,
                                   classes=list(CLASSES))
        if df.empty:
            raise DataError(f"tasks.sentiment: none of the {rows:,} reviews in {inputs.data.reviews or 'the data'} has "
                            "both a rating and a title or text: give reviews those columns, or set "
                            "tasks.sentiment.enabled=false")
        counts = self.write_examples(df, inputs.out, CLASSES)
        used = int(labelled["count"].sum()) if len(labelled) else 0
        return Prepared(counts, {"classes": {c: int((df["label_name"] == c).sum()) for c in CLASSES},
                                 "left_out": {"no_rating_or_text": int(rows - used)}})

    def left_out(self, info: dict) -> list[str]:
        n = info.get("left_out", {}).get("no_rating_or_text", 0)
        return [f"{n:,} reviews left out of sentiment: no rating, or neither title nor text"] if n else []


TASK = Sentiment()


def review_pairs(batch: pd.DataFrame, *, negative_max: float, positive_min: float) -> pa.Table:
    """(normalized "title. text", class name) per review with a rating and some text."""
    title = [ex.text_or_none(t) for t in batch["title"].astype(object)] if "title" in batch else [None] * len(batch)
    body = [ex.text_or_none(t) for t in batch["text"].astype(object)] if "text" in batch else [None] * len(batch)
    texts = [". ".join(p for p in (a, b) if p) or None for a, b in zip(title, body)]
    rating = pd.to_numeric(batch["rating"], errors="coerce").to_numpy(float) if "rating" in batch else np.full(len(batch), np.nan)
    label = np.where(rating <= negative_max, CLASSES[0], np.where(rating >= positive_min, CLASSES[2], CLASSES[1]))
    keep = [t is not None and not np.isnan(r) for t, r in zip(texts, rating)]
    out = pd.DataFrame({"text": [ex.normalize_text(t) for t, k in zip(texts, keep) if k],
                        "label": [lab for lab, k in zip(label.tolist(), keep) if k]})
    return pa.Table.from_pandas(out, schema=PAIR_SCHEMA, preserve_index=False)
