"""Hashed word and character n-gram features (fastText-style) for a learned bag of text features.

A text's features are, for each lower-cased word w, the word itself as "<w>" and every 3- to
5-character n-gram of "<w>", each hashed into `buckets` ids. A misspelt query word ("waetrproof")
shares most of its n-grams with the word it means ("waterproof"), which neither a word-level model
nor the encoder's word pieces ("wa", "##et", "##rp", "##roof") see.

The hash is CRC-32, stable across processes and machines: Python's own str hash is salted per
process, and the ids must mean the same in the trainer, the labeling workers and a served model.
"""
from __future__ import annotations

import zlib
from functools import lru_cache

import torch

MIN_N, MAX_N = 3, 5


@lru_cache(maxsize=1 << 17)
def word_features(word: str, buckets: int, shift: int = 0) -> tuple[int, ...]:
    """Ids (+ `shift`) of "<word>" and of its 3..5-character n-grams (words repeat a lot: cached)."""
    w = f"<{word}>"
    grams = [w] + [w[i:i + n] for n in range(MIN_N, MAX_N + 1) for i in range(len(w) - n + 1)
                   if w[i:i + n] != w]
    return tuple(zlib.crc32(g.encode("utf-8", "surrogatepass")) % buckets + shift for g in grams)


def text_features(text: str, buckets: int, shift: int = 0) -> list[int]:
    """The features of every lower-cased whitespace-separated word, in order, each id + `shift`."""
    out: list[int] = []
    for word in (text or "").lower().split():
        out += word_features(word, buckets, shift)
    return out


def bag_inputs(texts: list[str], buckets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """texts -> (ids [N] int64, offsets [B] int64), the flat form `nn.EmbeddingBag` takes. An empty
    text is an empty bag (the bag then contributes zeros)."""
    ids: list[int] = []
    offsets: list[int] = []
    for text in texts:
        offsets.append(len(ids))
        ids.extend(text_features(text, buckets))
    return torch.tensor(ids, dtype=torch.long), torch.tensor(offsets, dtype=torch.long)
