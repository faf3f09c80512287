import pytest
import torch
from distillery.errors import DistilleryError
from distillery.histories import pad_histories
from distillery.models.teacher import load_backbone, mean_pool


@pytest.fixture
def teacher(tiny_teacher):
    return tiny_teacher


def test_mean_pool_matches_reference():
    h = torch.arange(12.0).reshape(1, 3, 4)
    mask = torch.tensor([[1, 1, 0]])
    assert torch.allclose(mean_pool(h, mask), h[0, :2].mean(0, keepdim=True))


def test_pad_histories_keeps_the_most_recent_left_padded():
    out = pad_histories([[2, 3, 4, 5], [], [7]], max_len=3)
    assert out.tolist() == [[3, 4, 5], [0, 0, 0], [0, 0, 7]]


def test_heads_shapes_and_masking(teacher):
    model, tok = teacher
    enc = tok(["red pen", "wireless earbuds for running"], padding=True, return_tensors="pt")
    assert model.class_logits("intent", enc["input_ids"], enc["attention_mask"]).shape == (2, 3)
    hist = pad_histories([[2, 3], []], 5)  # an empty history must still give a user vector
    scores = model.rec_scores(hist)
    assert scores.shape == (2, 12) and torch.isinf(scores[:, :2]).all() and torch.isfinite(scores[:, 2:]).all()
    logits = model.ctr_logits(hist, torch.tensor([4, 5]), torch.tensor([0, -1]))
    assert logits.shape == (2,) and torch.isfinite(logits).all()


def test_an_ensemble_ranks_by_its_members_geometric_mean_probability_and_averages_ctr_logits(tiny_bert):
    from conftest import tiny_teacher_model
    from distillery.models.teacher import load_backbone as load

    backbone, _ = load(tiny_bert)
    model = tiny_teacher_model(backbone, members=3, widths=(16, 24)).eval()
    hist, cand, slot = pad_histories([[2, 3], [4]], 5), torch.tensor([5, 6]), torch.tensor([-1, 2])
    items = model.item_vectors()
    assert [tuple(v.shape) for v in items] == [(12, 16), (12, 24), (12, 16)]
    with torch.no_grad():
        probs = []
        for m, v in zip(model.members, items):  # the reference: each member's softmax over the real items
            s = (m.seq.user_vectors(hist, v) @ v.T)[:, 2:]
            probs.append(torch.softmax(s, 1))
        got = model.rec_scores(hist, items)
    assert torch.isinf(got[:, :2]).all()
    geo = torch.log(probs[0] * probs[1] * probs[2]) / 3  # equal to the mean score less a constant per row
    assert torch.allclose(torch.softmax(got[:, 2:], 1), torch.softmax(geo, 1), atol=1e-6)
    want = torch.stack([m.ctr_logits(hist, cand, slot, v) for m, v in zip(model.members, items)]).mean(0)
    assert torch.allclose(model.ctr_logits(hist, cand, slot, items), want)


def test_a_one_member_teacher_scores_as_its_member(tiny_bert):
    from conftest import tiny_teacher_model
    from distillery.models.teacher import load_backbone as load

    model = tiny_teacher_model(load(tiny_bert)[0], members=1).eval()
    hist = pad_histories([[2, 3], [4]], 5)
    with torch.no_grad():
        assert torch.equal(model.rec_scores(hist), model.members[0].rec_scores(hist))


def test_rec_and_ctr_gradients_reach_ids_text_adaptor_and_the_ctr_head(teacher):
    model, _ = teacher
    model.train()
    hist = pad_histories([[2, 3]], 5)
    loss = torch.nn.functional.cross_entropy(model.rec_scores(hist), torch.tensor([4])) \
        + model.ctr_logits(hist, torch.tensor([4]), torch.tensor([0])).sum()
    loss.backward()
    seq = model.members[0].seq
    assert seq.item.weight.grad.abs().sum() > 0 and seq.adaptor[1].weight.grad.abs().sum() > 0 \
        and seq.adaptor[-1].weight.grad.abs().sum() > 0
    assert model.members[0].ctr.mlp[0].weight.grad.abs().sum() > 0


def test_unloadable_teacher_names_the_path(tmp_path):
    with pytest.raises(DistilleryError, match="not a folder with a Hugging Face model"):
        load_backbone(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(DistilleryError, match=f"cannot load the teacher from {tmp_path}"):
        load_backbone(str(tmp_path))


def test_pad_list_array_matches_pad_histories_and_handles_nulls_and_slices():
    import pyarrow as pa
    from distillery.histories import pad_list_array

    hist = [[5, 6, 7], [], None, [2, 3, 4, 5, 6, 7, 8], [9]]
    arr = pa.array(hist, pa.list_(pa.int32()))
    assert torch.equal(pad_list_array(arr, 4), pad_histories([h or [] for h in hist], 4))
    assert pad_list_array(arr.slice(3), 2).tolist() == [[7, 8], [0, 9]]
    assert pad_list_array(pa.chunked_array([arr.slice(0, 1), arr.slice(4)]), 3).tolist() == [[5, 6, 7], [0, 0, 9]]


def test_text_augmentations_are_seeded_and_bounded():
    import numpy as np
    from distillery.teaching.augment import add_typos, drop_words

    texts = ["wireless noise cancelling earbuds", "mips bike helmet", "pen", "a b"]
    rng = lambda: np.random.default_rng(7)  # noqa: E731
    assert add_typos(texts, 0.0, rng()) == texts and drop_words(texts, 0.0, rng()) == texts
    typo = add_typos(texts, 1.0, rng())
    assert typo == add_typos(texts, 1.0, rng())  # same seed, same edits
    def one_dropped(longer: str, shorter: str) -> bool:
        return any(longer[:i] + longer[i + 1:] == shorter for i in range(len(longer)))

    for before, after in zip(texts, typo):
        if len(before) <= 3:
            assert after == before  # too short to edit
        else:  # exactly one edit: two neighbours swapped, one character dropped or one doubled
            swapped = len(after) == len(before) and sum(a != b for a, b in zip(after, before)) in (0, 2) \
                and sorted(after) == sorted(before)
            assert swapped or one_dropped(before, after) or one_dropped(after, before), (before, after)
    assert sum(a != b for a, b in zip(typo, texts)) >= 2  # the edits change the texts (a swap of equal letters may not)
    dropped = drop_words(texts, 1.0, rng())
    for before, after in zip(texts, dropped):
        kept = after.split()
        assert 1 <= len(kept) <= len(before.split())
        it = iter(before.split())
        assert all(w in it for w in kept)  # a subsequence: words keep their order


def test_lexical_bag_widens_the_classifier_head_and_ignores_padding(tiny_bert):
    from conftest import tiny_teacher_model
    from distillery.models.teacher import text_inputs

    backbone, tok = load_backbone(tiny_bert)
    model = tiny_teacher_model(backbone, lexical_dim=8).eval()
    assert model.classifiers["intent"].head[1].in_features == 32 + 8 and model.lexical_buckets == 4096
    one = text_inputs(tok, ["mips helmet"], max_length=16, buckets=model.lexical_buckets)
    both = text_inputs(tok, ["mips helmet", "a much longer query about wireless earbuds"], max_length=16,
                       buckets=model.lexical_buckets)
    a = model.class_logits("intent", **one)
    b = model.class_logits("intent", **both)[:1]
    assert torch.allclose(a, b, atol=1e-5)  # neither padding nor a neighbour's bag changes a text's logits
    with pytest.raises(ValueError, match="bag_ids"):
        model.class_logits("intent", one["input_ids"], one["attention_mask"])
    model.class_logits("intent", **one).sum().backward()
    assert model.classifiers["intent"].lexical.weight.grad.abs().sum() > 0


def test_trimming_shared_padding_keeps_every_score(teacher):
    from distillery.histories import trim_padding

    model, _ = teacher
    hist = pad_histories([[2, 3], [4], []], 5)
    trimmed = trim_padding(hist)
    assert trimmed.tolist() == [[2, 3], [0, 4], [0, 0]]
    assert trim_padding(torch.zeros(2, 5, dtype=torch.long)).shape == (2, 1)
    assert torch.allclose(model.rec_scores(trimmed), model.rec_scores(hist), atol=1e-5, equal_nan=True)
    args = (torch.tensor([5, 6, 7]), torch.tensor([0, -1, 3]))
    assert torch.allclose(model.ctr_logits(trimmed, *args), model.ctr_logits(hist, *args), atol=1e-5)


def test_the_serve_benchmarks_teacher_runtime_scores_as_the_teacher(tiny_bert):
    """benchmarks/serve_load.py serves the teacher through Service's user-state split; it must give
    the ensemble's own recommendation scores and click logits."""
    import importlib.util
    from pathlib import Path

    from conftest import tiny_teacher_model

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"
    spec = importlib.util.spec_from_file_location("serve_load", path)
    serve_load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve_load)
    model = tiny_teacher_model(load_backbone(tiny_bert)[0], members=2, widths=(16, 24)).eval()
    rt = object.__new__(serve_load.TeacherRuntime)  # its __init__ only loads a saved teacher
    rt.model = model
    with torch.inference_mode():
        rt.items = model.item_vectors()
        history = torch.tensor([[0, 0, 3, 4, 5], [0, 0, 0, 0, 0], [2, 7, 8, 9, 10]])
        users, _ = rt.users(history)
        expected = model.rec_scores(history)
        item, slot = torch.tensor([3, 6, 11]), torch.tensor([-1, 0, 2])
        ctr = model.ctr_logits(history, item, slot)
    got = rt.rec_from_users(users)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    assert torch.allclose(got[:, 2:], expected[:, 2:], atol=1e-5)
    assert torch.allclose(rt.ctr_from_users(users, item, slot), ctr, atol=1e-5)


def _member():
    from distillery.models.seqrec import SeqSpec, SequenceModel
    from distillery.models.teacher import CtrHead, SeqMember

    torch.manual_seed(0)
    spec = SeqSpec(n_items=12, dim=16, layers=1, heads=2, dropout=0.0, max_history=5, text_dim=8)
    return SeqMember(SequenceModel(spec, torch.randn(12, 8)), CtrHead(16, 4, torch.arange(12) % 4))


@pytest.mark.parametrize("trains_encoder", [False, True])
def test_member_loss_lets_ctr_into_the_sequence_model_only_when_asked(trains_encoder):
    from distillery.models.seqrec import NextItemLoss
    from distillery.losses import MemberLoss

    member = _member()
    loss = MemberLoss(member, NextItemLoss(), {"next_item": 1.0, "click": 2.0}, trains_encoder)
    batch = {"ctr_history": torch.tensor([[0, 3, 4], [5, 6, 7]]), "ctr_item": torch.tensor([8, 9]),
             "ctr_slot": torch.tensor([0, -1]), "ctr_label": torch.tensor([1.0, 0.0])}
    out = loss(batch)
    assert set(out) == {"click", "total"} and torch.allclose(out["total"], 2.0 * out["click"])
    out["total"].backward()
    seq_grad = sum(p.grad.abs().sum() for p in member.seq.parameters() if p.grad is not None)
    assert all(p.grad is not None for p in member.ctr.mlp.parameters())
    assert (seq_grad > 0) == trains_encoder


def test_member_loss_of_a_batch_without_rows_is_a_zero_that_backpropagates():
    from distillery.models.seqrec import NextItemLoss
    from distillery.losses import MemberLoss

    member = _member()
    out = MemberLoss(member, NextItemLoss(), {"next_item": 1.0, "click": 1.0})({})
    assert out["total"].item() == 0.0
    out["total"].backward()  # the plain int 0 that sum() of nothing gives could not
    assert all(p.grad is None or not p.grad.any() for p in member.parameters())


def test_member_loss_names_the_terms_when_given_a_weight_it_has_no_term_for():
    from distillery.models.seqrec import NextItemLoss
    from distillery.losses import MemberLoss

    with pytest.raises(ValueError, match=r"unknown terms \['recommendation'\].*next_item"):
        MemberLoss(_member(), NextItemLoss(), {"recommendation": 1.0})


def test_the_sequence_models_learn_each_task_by_its_target():
    from distillery.config import RunConfig
    from distillery.teaching.sequence import SequenceTasks, history_window

    both = SequenceTasks.of(["intent", "ctr", "recommendation"])
    assert (both.next_item, both.click, both.names) == ("recommendation", "ctr", ["recommendation", "ctr"])
    assert both.scored_by() == "recommendation" and SequenceTasks.of(["ctr"]).scored_by() == "ctr"
    assert not SequenceTasks.of(["intent", "sentiment"])
    cfg = RunConfig.model_validate({"tasks": {"recommendation": {"max_history": 7}, "ctr": {"max_history": 11}}})
    assert history_window(cfg) == 11
    assert both.weights(cfg) == {"next_item": cfg.tasks.recommendation.weight, "click": cfg.tasks.ctr.weight}


def test_the_teacher_is_one_implementation_of_the_interface_the_stages_call():
    from distillery.models.teacher import Teacher, TeacherModel

    assert isinstance(Teacher({}, [_member()], max_history=5), TeacherModel)

    class ScoresOnly:  # an external scorer that cannot classify texts is not a teacher
        max_history = 5

        def item_vectors(self): ...

        def rec_scores(self, history, items=None): ...

        def ctr_logits(self, history, item, slot, items=None): ...

    assert not isinstance(ScoresOnly(), TeacherModel)
