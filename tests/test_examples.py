"""Task example builders on hand-made users: splits, histories, negatives, intent merging."""
import numpy as np
import pandas as pd
from distillery.data import examples as ex
from distillery.tasks.user_examples import user_examples
from hypothesis import given, settings
from hypothesis import strategies as st

ITEMS = np.array([f"i{k}" for k in range(10)], dtype=object)  # vocab index = k + 2


def _log(rows):
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "_order", "clicked", "impression_id", "slot"])
    return df


def _build(df, real, **kw):
    args = dict(item_ids=ITEMS, tasks=("recommendation", "ctr"), rec_history=3, ctr_history=2,
                real_impressions=real, negative_ratio=2, neg_cdf=ex.negative_cdf(np.ones(len(ITEMS)), 1.0), seed=0)
    args.update(kw)
    return user_examples(df, **args).to_pandas()


def test_leave_one_out_and_history_truncation():
    seq = [f"i{k}" for k in (0, 1, 2, 3, 4)]
    df = _log([("u", it, t, 1, None, None) for t, it in enumerate(seq)][::-1])  # order must not matter
    out = _build(df, real=False)
    rec = out[out["task"] == "recommendation"].reset_index(drop=True)
    assert rec["split"].tolist() == ["train", "train", "valid", "test"]
    assert rec["item"].tolist() == [3, 4, 5, 6]
    assert [list(h) for h in rec["history"]] == [[2], [2, 3], [2, 3, 4], [3, 4, 5]]  # max 3
    test = rec[rec["split"] == "test"].iloc[0]
    assert 6 not in list(test["history"])  # the test target never appears in its history


def test_sampled_negatives_are_deterministic_and_unseen():
    df = _log([("u", f"i{k}", k, 1, None, None) for k in range(4)])
    a, b = _build(df, real=False), _build(df.sample(frac=1, random_state=1), real=False)
    ctr = a[a["task"] == "ctr"]
    assert ctr.reset_index(drop=True).equals(b[b["task"] == "ctr"].reset_index(drop=True))
    assert (ctr["label"] == 1).sum() == 3 and (ctr["label"] == 0).sum() == 6  # ratio 2
    negs = set(ctr.loc[ctr["label"] == 0, "item"])
    assert not negs & {2, 3, 4, 5}  # never an item the user clicked
    assert set(ctr.groupby("split")["label"].mean().round(3)) == {round(1 / 3, 3)}


def test_real_impressions_split_at_the_users_last_clicks():
    rows = [
        ("u", "i0", 10, 1, "A", 0), ("u", "i5", 10, 0, "A", 1),
        ("u", "i1", 20, 0, "B", 0), ("u", "i2", 20, 1, "B", 1),   # second-to-last click -> valid from here
        ("u", "i6", 25, 0, "C", 0),
        ("u", "i3", 30, 1, "D", 0), ("u", "i7", 30, 0, "D", 1),   # last click -> test from here
        ("u", "i8", 40, 0, "E", 0),
    ]
    out = _build(_log(rows), real=True)
    ctr = out[out["task"] == "ctr"].reset_index(drop=True)
    assert ctr["split"].tolist() == ["train", "train", "valid", "valid", "valid", "test", "test", "test"]
    assert ctr["label"].tolist() == [1, 0, 0, 1, 0, 1, 0, 0]
    # history = clicks strictly before the impression, at most 2
    assert [list(h) for h in ctr["history"]] == [[], [], [2], [2], [2, 4], [2, 4], [2, 4], [4, 5]]
    assert ctr["slot"].tolist()[:2] == [0, 1] and ctr["impression_id"].tolist()[0] == "A"
    rec = out[out["task"] == "recommendation"]
    assert rec["split"].tolist() == ["valid", "test"]  # same cut points as ctr: 3 clicks, 2 targets


def test_short_users():
    one = _build(_log([("u", "i0", 0, 1, None, None)]), real=False)
    assert one.empty
    two = _build(_log([("u", "i0", 0, 1, None, None), ("u", "i1", 1, 1, None, None)]), real=False)
    assert two[two["task"] == "recommendation"]["split"].tolist() == ["test"]


def test_unknown_items_map_to_unk():
    assert ex.lookup(ITEMS, ["i3", "nope"]).tolist() == [5, ex.UNK]


def test_intent_pairs_and_examples():
    labels = np.array(["A > x", "B > y"] + ["C > z"] * 8, dtype=object)
    batch = pd.DataFrame({"title": ["  Red PEN ", None, "", "Red pen"], "item_id": ["i0", "i1", "i2", "nope"]})
    pairs = ex.intent_pairs(batch, text_col="title", item_ids=ITEMS, item_labels=labels)
    # "nope" is no catalogue item: its text stays, unlabelled, for prepare to count as left out
    assert pairs.to_dict("records") == [{"text": "red pen", "label": "A > x"}, {"text": "red pen", "label": None}]

    counts = pd.DataFrame({"text": ["red pen", "red pen", "blue pen", "ink", "ink", "paper"],
                           "label": ["A", "B", "A", "B", "A", "C"], "count": [3, 1, 1, 2, 2, 1]})
    out, names = ex.intent_examples(counts, min_class_count=2, fractions=(0.8, 0.1, 0.1), prefix="intent")
    got = dict(zip(out["text"], out["label_name"]))
    assert got == {"red pen": "A", "blue pen": "A", "ink": "A", "paper": "other"}  # majority; tie -> first label
    assert names == ["A", "other"]
    assert dict(zip(out["text"], out["count"]))["red pen"] == 4
    assert out["split"].isin(ex.SPLITS).all() and out["example_id"].is_unique


def test_text_split_is_a_pure_function_of_the_text():
    texts = [f"query {k}" for k in range(2000)]
    splits = [ex.split_of_text(ex.normalize_text(t)) for t in texts]
    assert splits == [ex.split_of_text(ex.normalize_text(t.upper() + "  ")) for t in texts]
    share = pd.Series(splits).value_counts(normalize=True)
    assert abs(share["train"] - 0.8) < 0.03 and abs(share["test"] - 0.1) < 0.03


words = st.text(alphabet="abcdefgh", min_size=1, max_size=4)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(texts=st.lists(st.lists(words, min_size=1, max_size=7).map(" ".join), min_size=1, max_size=8, unique=True),
       variants=st.integers(0, 6))
def test_transfer_texts_are_new_word_subsets_of_train_texts(texts, variants):
    from distillery.data.examples import transfer_examples, transfer_texts

    train, held_out = texts[::2], set(texts[1::2])
    out = transfer_texts(train, set(texts), variants)
    assert out == transfer_texts(train, set(texts), variants)  # deterministic
    assert len(out) == len(set(out)) <= variants * len(train)
    assert not set(out) & (set(train) | held_out)  # never a text of any split
    for text in out:
        w = text.split()
        assert w and any(_subsequence(w, t.split()) for t in train)
    ex = transfer_examples(out)
    assert (ex["label"] == -1).all() and (ex["split"] == "transfer").all() and ex["example_id"].is_unique


def _subsequence(short: list[str], long: list[str]) -> bool:
    it = iter(long)
    return all(w in it for w in short)


# ------------------------------------------------------------------------------ missing optional fields
# what pandas 3 reads back for a missing string (NaN), and the other ways a field can be empty
MISSING = st.sampled_from([None, float("nan"), "", "   "])
FIELD = st.one_of(MISSING, st.text(alphabet="abc >", min_size=1, max_size=8).filter(str.strip))


def test_missing_text_is_none_and_a_missing_category_has_no_label():
    for v in (None, float("nan"), "", "  ", 3.0, pd.NA):
        assert ex.text_or_none(v) is None and ex.category_at(v, 2) is None
    assert ex.category_at("A > B > C", 2) == "A > B" and ex.text_or_none(" x ") == " x "


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(FIELD, FIELD, FIELD, FIELD), min_size=1, max_size=6))
def test_item_text_uses_what_is_present_and_never_spells_a_missing_value(rows):
    from distillery.stages.prepare import _coverage, _item_text

    items = pd.DataFrame(rows, columns=["title", "brand", "category", "description"])
    items["price"] = np.nan
    texts = _item_text(items)
    for (title, brand, cat, desc), text in zip(rows, texts):
        present = [v for v in (title, brand, cat, desc) if ex.text_or_none(v)]
        assert isinstance(text, str) and (text == "") == (not present)
        assert "nan" not in text and "None" not in text  # the alphabet has neither
        head = ex.text_or_none(title) or (ex.text_or_none(desc) or "")[:200]
        assert text.startswith(head)
        for v in (brand, cat):
            if ex.text_or_none(v):
                assert v in text
    cov = _coverage(items, texts, pd.Series(np.zeros(len(items), int)), pd.Series([1, 2, 3]))
    assert cov["items_without"]["text"] == sum(t == "" for t in texts)
    assert cov["items_without"]["category"] == sum(ex.text_or_none(c) is None for c in items["category"])
    assert cov["items_without"]["price"] == len(items) and cov["items_never_clicked"] == len(items)
    assert (cov["users_without_examples"], cov["users_with_test_example_only"]) == (1, 1)


def test_intent_pairs_keep_texts_of_uncategorized_items_unlabelled():
    labels = np.array([ex.category_at(c, 1) for c in ["A > x", float("nan"), None] + ["B"] * 7], dtype=object)
    batch = pd.DataFrame({"title": ["pen", "ink", "cap", float("nan")], "item_id": ["i0", "i1", "i2", "i3"]})
    pairs = ex.intent_pairs(batch, text_col="title", item_ids=ITEMS, item_labels=labels)
    assert pairs.to_dict("records") == [{"text": "pen", "label": "A"}, {"text": "ink", "label": None},
                                        {"text": "cap", "label": None}]
