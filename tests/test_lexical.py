import zlib

import torch

from distillery.lexical import bag_inputs, text_features, word_features


def test_word_features_are_the_word_and_its_3_to_5_grams_hashed_with_crc32():
    grams = ["<mips>", "<mi", "mip", "ips", "ps>", "<mip", "mips", "ips>", "<mips", "mips>"]
    assert word_features("mips", 1 << 20) == tuple(zlib.crc32(g.encode()) % (1 << 20) for g in grams)
    assert word_features("a", 1000) == (zlib.crc32(b"<a>") % 1000,)  # "<a>" is its own only 3-gram


def test_text_features_lowercase_and_split_on_whitespace():
    assert text_features("Bike  HELMET", 4096) == list(word_features("bike", 4096) + word_features("helmet", 4096))
    assert text_features("", 4096) == [] and text_features(None, 4096) == []


def test_a_typo_keeps_most_ngrams_of_the_word():
    right, typo = set(word_features("waterproof", 1 << 20)), set(word_features("waetrproof", 1 << 20))
    assert len(right & typo) >= len(right) // 3
    assert not set(word_features("stapler", 1 << 20)) & right


def test_bag_inputs_are_flat_ids_and_offsets_for_embedding_bag():
    ids, offsets = bag_inputs(["ab", "", "ab cd"], 512)
    assert offsets.tolist() == [0, len(text_features("ab", 512)), len(text_features("ab", 512))]
    assert ids.tolist() == text_features("ab", 512) + text_features("ab cd", 512)
    bag = torch.nn.EmbeddingBag(512, 4, mode="mean")
    out = bag(ids, offsets)
    assert out.shape == (3, 4) and torch.all(out[1] == 0)  # the empty text is a zero vector
