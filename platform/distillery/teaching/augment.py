"""Text augmentation for fine-tuning a text classifier on shoppers' texts."""
from __future__ import annotations

import numpy as np


def add_typos(texts: list[str], rate: float, rng: np.random.Generator) -> list[str]:
    """One random edit (swap two neighbours, drop or double a character) in a `rate` share of the
    texts. Shoppers misspell queries, and an encoder fine-tuned on clean text alone is brittle to it."""
    out = []
    for text in texts:
        if len(text) > 3 and rng.random() < rate:
            i, op = int(rng.integers(0, len(text) - 1)), int(rng.integers(3))
            text = (text[:i] + text[i + 1] + text[i] + text[i + 2:], text[:i] + text[i + 1:],
                    text[:i] + text[i] + text[i:])[op]
        out.append(text)
    return out


def drop_words(texts: list[str], rate: float, rng: np.random.Generator) -> list[str]:
    """Cut a `rate` share of the texts to a random subset of their words (each kept with p=1/2, at
    least one). Queries are often one attribute or noun of a title ("mips", "neoprene"); without
    this the encoder learned those words only inside whole titles and missed them alone, where a
    bag-of-words baseline did not (see ARCHITECTURE.md for what it measured)."""
    out = []
    for text in texts:
        words = text.split()
        if len(words) > 1 and rng.random() < rate:
            kept = [w for w in words if rng.random() < 0.5]
            text = " ".join(kept or [words[int(rng.integers(len(words)))]])
        out.append(text)
    return out
