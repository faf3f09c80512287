"""Shopping intent: the product category a shopper's text (a search query, an item or review title)
is about, at `tasks.intent.category_level` of the category path.

The KD student also trains on transfer texts (split `transfer`: word subsets and spans of train
texts) that carry only the teacher's label; the no-distillation baseline cannot use them.
"""
from __future__ import annotations

from ..data.examples import ALL_SPLITS, TRANSFER
from .text import TextClassification


class Intent(TextClassification):
    name = "intent"
    label_splits = ALL_SPLITS
    train_splits = ("train", TRANSFER)
    tuned = ("kd_class_power",)
    summary = "the product category shopping texts are about"
    demo_texts = ("toner cartridge for a laser printer", "wireless earbuds")
