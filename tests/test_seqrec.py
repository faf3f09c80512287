"""The sequence recommender: its losses against reference computations, causality and padding,
and the training sequences taken from prepare's examples."""
import math

import pandas as pd
import pytest
import torch
from distillery.models.seqrec import NextItemLoss, SeqSpec, SequenceModel, whitening
from distillery.teaching.sequence import sequence_batches, user_sequences


def _model(**kw) -> SequenceModel:
    torch.manual_seed(0)
    spec = SeqSpec(**{"n_items": 12, "dim": 8, "layers": 2, "heads": 2, "dropout": 0.0, "max_history": 6, **kw})
    text = torch.randn(12, 5) if spec.text_dim else None
    return SequenceModel(spec, text).eval()


def test_full_softmax_loss_is_cross_entropy_at_every_target_position():
    torch.manual_seed(1)
    states, items = torch.randn(2, 3, 4), torch.randn(7, 4)
    targets = torch.tensor([[0, 3, 5], [2, 0, 6]])  # 0: no target at that position
    want, n = 0.0, 0
    for b in range(2):
        for t in range(3):
            y = int(targets[b, t])
            if y == 0:
                continue
            logits = [float(states[b, t] @ items[j]) for j in range(2, 7)]  # ids 0 and 1 are never candidates
            m = max(logits)
            want += -(logits[y - 2] - m - math.log(sum(math.exp(x - m) for x in logits)))
            n += 1
    assert NextItemLoss()(states, targets, items).item() == pytest.approx(want / n, rel=1e-5)


def test_sampled_softmax_subtracts_log_q_and_masks_hits_of_the_target():
    torch.manual_seed(2)
    states, items = torch.randn(1, 2, 4), torch.randn(8, 4)
    targets = torch.tensor([[3, 6]])
    q = torch.tensor([0, 0, 1.0, 2.0, 3.0, 1.0, 1.0, 2.0])
    loss = NextItemLoss(num_negatives=4, proposal=q)
    gen = torch.Generator().manual_seed(7)
    got = loss(states, targets, items, generator=gen).item()
    negs = torch.multinomial(q / q.sum(), 4, replacement=True, generator=torch.Generator().manual_seed(7)).tolist()
    p = (q / q.sum()).tolist()
    want = 0.0
    for t, y in enumerate([3, 6]):
        def logit(j):
            return float(states[0, t] @ items[j]) - math.log(4 * p[j])
        cands = [logit(y)] + [logit(j) for j in negs if j != y]  # a negative equal to the target is masked
        m = max(cands)
        want += -(cands[0] - m - math.log(sum(math.exp(c - m) for c in cands)))
    assert got == pytest.approx(want / 2, rel=1e-5)
    # with as many negatives as the catalogue it falls back to the exact softmax
    assert NextItemLoss(num_negatives=6, proposal=q)(states, targets, items).item() == \
        pytest.approx(NextItemLoss()(states, targets, items).item())


def test_states_are_causal_and_padding_does_not_matter():
    model = _model()
    items = model.item_vectors()
    h = torch.tensor([[0, 0, 3, 4, 5, 6]])
    later = torch.tensor([[0, 0, 3, 4, 5, 9]])
    a, b = model.states(h, items), model.states(later, items)
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-6) and not torch.allclose(a[:, 5], b[:, 5])
    assert torch.all(a[:, :2] == 0)  # padding positions
    short = model.states(torch.tensor([[3, 4, 5, 6]]), items)  # the same history, less padding
    assert torch.allclose(short[:, -1], a[:, -1], atol=1e-5)
    scores = model.rec_scores(h)
    assert scores.shape == (1, 12) and torch.isinf(scores[:, :2]).all()


def test_the_text_adaptor_is_an_mlp_with_a_hidden_width_or_linear_without():
    mlp, linear = _model(text_dim=5, adaptor_hidden=7), _model(text_dim=5)
    assert [tuple(m.weight.shape) for m in mlp.adaptor if isinstance(m, torch.nn.Linear)] == [(7, 5), (8, 7)]
    assert [tuple(m.weight.shape) for m in linear.adaptor if isinstance(m, torch.nn.Linear)] == [(8, 5)]
    mlp.eval()
    want = mlp.item.weight + mlp.adaptor[4](torch.nn.functional.gelu(mlp.adaptor[1](mlp.item_text)))
    assert torch.allclose(mlp.item_vectors(), want, atol=1e-6)


def test_text_items_need_the_embeddings_and_whitening_decorrelates():
    model = _model(text_dim=5)
    assert model.item_vectors().shape == (12, 8)
    with pytest.raises(ValueError, match="needs item IDs"):
        SequenceModel(SeqSpec(n_items=12, text_dim=0, use_id=False))
    torch.manual_seed(0)
    emb = torch.randn(50, 4) @ torch.tensor([[3.0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 2, 0], [1, 0, 0, 0.5]])
    mean, w = whitening(emb)
    white = (emb[2:] - mean) @ w
    assert torch.allclose(torch.cov(white.T), torch.eye(4), atol=1e-3)


def test_user_sequences_are_each_users_last_train_example_and_its_target():
    df = pd.DataFrame({
        "example_id": ["rec:u1:1", "rec:u1:2", "rec:u:2:1", "rec:u1:3"],  # a user id with a colon
        "user_id": ["u1", "u1", "u:2", "u1"],
        "history": [[5], [5, 6], [9], [5, 6, 7]],
        "item": [6, 7, 4, 8],
    })
    t = user_sequences(df).to_pandas().set_index("user_id")
    assert list(t.loc["u1", "sequence"]) == [5, 6, 7, 8] and list(t.loc["u:2", "sequence"]) == [9, 4]


def test_sequence_batches_cover_every_user_once_trimmed_to_their_longest():
    seqs = torch.zeros(10, 6, dtype=torch.long)
    for i in range(10):
        seqs[i, 6 - (i % 5 + 2):] = torch.arange(2, 2 + i % 5 + 2)
    batches = sequence_batches(seqs, None, 3, 4, torch.Generator().manual_seed(0), "cpu")
    assert len(batches) == 3
    seen = torch.cat([b["sequences"][:, -2:] for b in batches])
    assert len(seen) == 10
    for b in batches:
        s = b["sequences"]
        assert (s[:, 0] != 0).any()  # no all-padding column kept on the left


@pytest.mark.parametrize("per_target", [False, True])
def test_per_target_weighting_gives_every_target_of_the_epoch_the_same_weight(per_target):
    from distillery.models.teacher import SeqMember
    from distillery.losses import MemberLoss

    # bucketed by length (jitter < 4): the short users and the long ones fall in separate batches
    lengths = [2, 2, 2, 2, 2, 2, 10, 10, 9, 10, 10, 10]
    seqs = torch.zeros(len(lengths), 10, dtype=torch.long)
    gen = torch.Generator().manual_seed(3)
    for i, n in enumerate(lengths):
        seqs[i, 10 - n:] = torch.randint(2, 12, (n,), generator=gen)
    member = SeqMember(_model(max_history=10))
    loss = MemberLoss(member, NextItemLoss(), {"next_item": 1.0})
    batches = sequence_batches(seqs, None, 2, 4, torch.Generator().manual_seed(0), "cpu", per_target=per_target)
    with torch.no_grad():
        epoch = sum(loss(b)["next_item"] for b in batches)
        # reference: cross entropy at every target of the epoch's batches, summed
        items, ce = member.item_vectors(), []
        for b in batches:
            states, targets = member.seq.states(b["sequences"][:, :-1], items), b["sequences"][:, 1:]
            logits = states[targets != 0] @ items.T
            logits[:, :2] = float("-inf")
            ce.append(torch.nn.functional.cross_entropy(logits, targets[targets != 0], reduction="none"))
    per_batch = [len(c) for c in ce]
    assert per_batch == [6, 54]  # 6 users x 1 target; the 6 others' 9 targets
    if per_target:  # the sum over every target over the mean per batch (30)
        assert [b["sequence_weight"] for b in batches] == pytest.approx([6 / 30, 54 / 30])
        assert float(epoch) == pytest.approx(float(torch.cat(ce).sum()) / 30, rel=1e-5)
    else:  # each batch's mean: a short user's target weighs 9 times a long user's
        assert all("sequence_weight" not in b for b in batches)
        assert float(epoch) == pytest.approx(sum(float(c.mean()) for c in ce), rel=1e-5)
