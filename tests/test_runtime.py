"""The serving runtime gives the student's own outputs, whatever the batch and padding."""
import pytest
import torch
from distillery.models.student import Student, StudentSpec, text_bag
from distillery.models.teacher import MAX_SLOTS, load_backbone
from distillery.serving.runtime import StudentRuntime, pad

ITEM_TEXTS = ["", "", "red gel pen", "bike helmet mips", "espresso beans dark roast", "stapler", "desk lamp"]


@pytest.fixture(scope="module")
def tok(tiny_bert):
    return load_backbone(tiny_bert)[1]


def _runtime(tok, layers: int):
    ids, offsets = text_bag(tok, ITEM_TEXTS, max_length=16, buckets=256)
    torch.manual_seed(layers)
    m = Student(vocab_size=tok.vocab_size, n_items=len(ITEM_TEXTS), n_categories=3, classes={"intent": 4, "sentiment": 3},
                item_category=torch.tensor([0, 1, 2, 2, 0, 1, 2]), item_bag_ids=ids, item_bag_offsets=offsets,
                dim=16, text_dim=8, ngram_buckets=256, max_history=5, heads=2, history_layers=layers).eval()
    for p in m.parameters():  # trained-looking weights: biases and the slot table non-zero
        p.data.normal_(0, 0.3)
    spec = StudentSpec(n_items=len(ITEM_TEXTS), n_categories=3, classes={"intent": tuple("abcd"), "sentiment": tuple("xyz")},
                       vocab_size=tok.vocab_size,
                       dim=16, text_dim=8, ngram_buckets=256, heads=2, layers=layers, dropout=0.1, max_history=5,
                       ctr_history=4, max_length=16, tasks=("recommendation", "ctr", "intent"))
    return m, StudentRuntime(m, tok, spec)


def test_pad_keeps_the_most_recent_items_and_pads_on_the_left():
    assert pad([[1, 2, 3], []], 2).tolist() == [[2, 3], [0, 0]]
    assert pad([[5, 6], [7]], 4, to_longest=True).tolist() == [[5, 6], [0, 7]]
    assert pad([[5, 6, 7]], 2, to_longest=True).tolist() == [[6, 7]]
    assert pad([[]], 4, to_longest=True).tolist() == [[0]]  # an empty history is one pad


@pytest.mark.parametrize("layers", [0, 1])
def test_runtime_matches_the_students_heads(tok, layers):
    m, rt = _runtime(tok, layers)
    lists = [[2, 3, 4, 5, 6, 2], [4], [], [6, 1, 3]]  # longer than max_history, unknown id 1, empty
    with torch.no_grad():
        fixed = pad(lists, 5)
        want = m.rec_scores(fixed)
        got = rt.rec_scores(rt.histories(lists, rt.rec_history))
        assert torch.equal(torch.isinf(got), torch.isinf(want)) and torch.isinf(got[:, :2]).all()
        assert torch.allclose(got.nan_to_num(0, 0, 0), want.nan_to_num(0, 0, 0), atol=1e-5)
        for i, h in enumerate(lists):  # one request at a time takes the unpadded path
            assert torch.allclose(rt.rec_scores(rt.histories([h], rt.rec_history)).nan_to_num(0, 0, 0),
                                  want[i:i + 1].nan_to_num(0, 0, 0), atol=1e-5)

        items, slots = torch.tensor([2, 6, 5, 3]), torch.tensor([-1, 0, MAX_SLOTS + 7, -5])  # out-of-range slots clamp
        want = m.ctr_logits(pad(lists, 4), items, slots)
        assert torch.allclose(rt.ctr_logits(rt.histories(lists, rt.ctr_history), items, slots), want, atol=1e-5)
        for i, h in enumerate(lists):
            assert torch.allclose(rt.ctr_logits(rt.histories([h], rt.ctr_history), items[i:i + 1], slots[i:i + 1]),
                                  want[i:i + 1], atol=1e-5)

        texts = ["red pen", "Waterproof BIKE helmet", "", "stapler"]
        ids, offsets = text_bag(tok, texts, max_length=16, buckets=256)
        for task, n in (("intent", 4), ("sentiment", 3)):  # each classifier folded on its own
            want = m.class_logits(task, ids, offsets)
            assert want.shape == (4, n)
            assert torch.allclose(rt.class_logits(task, *rt.text_inputs(texts)), want, atol=1e-5)
            for i, t in enumerate(texts):
                assert torch.allclose(rt.text_logits(task, [t]), want[i:i + 1], atol=1e-5)


def test_pooling_weights_explain_a_history_and_are_zero_for_padding(tok):
    _, rt = _runtime(tok, 0)
    users, weights = rt.users(rt.histories([[2, 3, 4], [5]], rt.rec_history))
    assert weights.shape == (2, 3) and torch.allclose(weights.sum(1), torch.ones(2))
    assert (weights[1, :2] == 0).all() and torch.isfinite(users).all()
    users, weights = rt.users(rt.histories([[]], rt.rec_history))
    assert (weights == 0).all() and (users == 0).all()
