"""Shopping intent: the product category a shopper's text is about, at `tasks.intent.category_level`
of the category path.

Examples: (normalized text, category) pairs from search queries (the clicked item's category), item
titles and review titles (`tasks.intent.sources`); identical texts merge (majority label), the split
is a hash of the text so a text never crosses splits, and classes with fewer than `min_class_count`
texts become "other". The KD student also trains on transfer texts (split `transfer`: word subsets
and spans of train texts) that carry only the teacher's label; the no-distillation baseline cannot
use them.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import ray.data
from ray.data.expressions import col

from .. import warmstart
from ..data import examples as ex
from ..data.tables import count_rows, write_frame
from ..errors import DataError
from .base import Prepared, PrepareInputs
from .text import PAIR_SCHEMA, TextClassification

LEFT_OUT = {
    "no_category": "their item has no category (no label to learn)",
    "outside_classes": "their label is not one of the warm-started run's classes",
}


class Intent(TextClassification):
    name = "intent"
    label_splits = ex.ALL_SPLITS
    train_splits = ("train", ex.TRANSFER)
    tuned = ("kd_class_power",)
    summary = "the product category shopping texts are about"
    demo_texts = ("toner cartridge for a laser printer", "wireless earbuds")

    def prepare(self, inputs: PrepareInputs) -> Prepared:
        task, inter, reviews, items = self.settings(inputs.cfg), inputs.interactions, inputs.reviews, inputs.items
        labels = np.array([ex.category_at(c, task.category_level) for c in items["category"]], dtype=object)
        kw = dict(item_ids=inputs.item_ids, item_labels=labels)
        pairs = []
        if "queries" in task.sources and "query" in inter.columns():
            pairs.append(inter.filter(expr=(col("clicked") == 1) & col("query").is_not_null())
                         .map_batches(_pairs, fn_kwargs=dict(text_col="query", **kw), batch_format="pandas"))
        if "item_titles" in task.sources:
            pairs.append(ray.data.from_arrow(_pairs(items, text_col="title", **kw)))
        if "review_titles" in task.sources and reviews is not None:
            pairs.append(reviews.map_batches(_pairs, fn_kwargs=dict(text_col="title", **kw), batch_format="pandas"))
        if not pairs:
            raise DataError(f"tasks.intent.sources={task.sources}, but the data has none of them: "
                            "add item_titles, or disable the task with tasks.intent.enabled=false")
        merged = pairs[0].union(*pairs[1:]) if len(pairs) > 1 else pairs[0]
        all_pairs = count_rows(merged, ["text", "label"])
        pair_counts = all_pairs[all_pairs["label"].notna()]
        # a text some other row labels (say, a query for an item with a category) is still an example
        unlabelled = set(all_pairs.loc[all_pairs["label"].isna(), "text"]) - set(pair_counts["text"])
        df, names = ex.intent_examples(pair_counts, min_class_count=task.min_class_count, fractions=task.split_fractions,
                                       prefix=self.name, classes=warmstart.classes(inputs.cfg, self.name))
        texts = pair_counts["text"].nunique() if len(pair_counts) else 0
        catalogue = inputs.data.items or "the catalogue"
        if len(names) < 2 and not len(all_pairs):
            raise DataError(
                f"tasks.intent has no text to learn from: tasks.intent.sources={task.sources}, but column 'title' of "
                f"{catalogue}, the log's 'query' and the reviews' 'title' are empty or absent. "
                "Add item titles, or set tasks.intent.enabled=false")
        if len(names) < 2:
            raise DataError(
                f"tasks.intent needs at least 2 intent classes, but column 'category' of {catalogue} "
                f"gives {len(names)} ({names}) at tasks.intent.category_level={task.category_level} with "
                f"min_class_count={task.min_class_count} ({len(unlabelled):,} texts have an item with no category). "
                "Give items categories, lower tasks.intent.min_class_count or category_level, "
                "or set tasks.intent.enabled=false")
        counts = self.write_examples(df, inputs.out, names)
        if task.transfer_variants:
            train = df.loc[df["split"] == "train", "text"].tolist()
            transfer = ex.transfer_examples(ex.transfer_texts(train, set(df["text"]), task.transfer_variants))
            write_frame(transfer, inputs.out.examples(self.name, ex.TRANSFER), ex.INTENT_SCHEMA)
            counts[ex.TRANSFER] = int(len(transfer))
        return Prepared(counts, {"classes": len(names), "merged_into_other": int((df["label_name"] == ex.OTHER).sum()),
                                 "left_out": {"no_category": len(unlabelled), "outside_classes": int(texts - len(df))}})

    def left_out(self, info: dict) -> list[str]:
        return [f"{n:,} intent texts left out: {LEFT_OUT[reason]}" for reason, n in info.get("left_out", {}).items() if n]


TASK = Intent()


def _pairs(batch: pd.DataFrame, **kw) -> pa.Table:
    # one schema for every block, even one whose labels are all missing (an all-null column)
    return pa.Table.from_pandas(ex.intent_pairs(batch, **kw), schema=PAIR_SCHEMA, preserve_index=False)
