"""Structural compression (`shrink.py`): each step gives a smaller dense student whose outputs equal
the original's where what it removed was zero or unused, and that survives a save and a load."""
import pytest
import torch
from distillery import quant, shrink
from distillery.models import student as S
from distillery.models.student import text_bag
from distillery.models.teacher import load_backbone
from distillery.serving.runtime import StudentRuntime
from hypothesis import given, settings
from hypothesis import strategies as st

ITEM_TEXTS = ["red gel pen", "bike helmet mips", "espresso beans dark roast", "stapler", "desk lamp"]
QUERIES = ["red pen", "stapler refill", "a lamp for my desk", "zzqx unseen wordpiece", ""]
BUCKETS = 64


@pytest.fixture(scope="module")
def tok(tiny_bert):
    return load_backbone(tiny_bert)[1]


def _student(tok, seed=0):
    spec = S.StudentSpec(n_items=len(ITEM_TEXTS) + 2, n_categories=3, classes={"intent": tuple("abcd"), "sentiment": tuple("xyz")},
                         vocab_size=tok.vocab_size, dim=16, text_dim=8, ngram_buckets=BUCKETS, heads=2, layers=0,
                         dropout=0.1, max_history=5, ctr_history=4, max_length=16,
                         tasks=("recommendation", "ctr", "intent"))
    torch.manual_seed(seed)
    model = S.build(spec, torch.tensor([0, 1, 2, 2, 0, 1, 2]), ITEM_TEXTS, tok)
    for p in model.parameters():  # trained-looking weights: biases non-zero
        p.data.normal_(0, 0.3)
    return model.eval(), spec


def _outputs(model, tok, spec, texts=QUERIES):
    history = torch.tensor([[0, 2, 3, 4], [0, 0, 0, 6], [0, 0, 0, 0]])
    ids, offsets = text_bag(tok, texts, max_length=16, buckets=BUCKETS)
    with torch.no_grad():
        return {"rec": model.rec_scores(history), "ctr": model.ctr_logits(history, torch.tensor([2, 5, 6]),
                                                                          torch.tensor([-1, 0, 3])),
                **{t: model.class_logits(t, ids, offsets) for t in spec.classes}}


def _assert_close(a, b):
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5, msg=k)


def _bags(tok, texts):
    return text_bag(tok, texts, max_length=16, buckets=BUCKETS)[0]


def test_folding_the_item_text_is_exact_and_drops_the_bags(tok):
    model, spec = _student(tok)
    folded, fspec = shrink.fold_item_text(model, spec)
    assert fspec.item_text is False and not hasattr(folded, "item_bag_ids")
    assert "item_bag_ids" not in folded.state_dict()
    _assert_close(_outputs(model, tok, spec), _outputs(folded, tok, fspec))


def test_a_pruned_vocabulary_is_exact_on_kept_texts_and_shares_one_row_for_the_rest(tok):
    model, spec = _student(tok)
    counts = shrink.token_counts(spec, [model.item_bag_ids, _bags(tok, QUERIES[:3])])
    pruned, pspec = shrink.prune_vocabulary(model, spec, counts)
    kept = int((counts > 0).sum())
    assert pruned.text.weight.shape == (kept + 1, 8) and pspec.text_rows_kept == kept
    # every text made of kept ids scores as before, item vectors included
    _assert_close(_outputs(model, tok, spec, QUERIES[:3]), _outputs(pruned, tok, pspec, QUERIES[:3]))
    # an id outside the kept set reads the shared row: the mean of the dropped rows
    unseen = int((counts == 0).nonzero()[0])
    dropped = model.text.weight[counts == 0].mean(0)
    torch.testing.assert_close(pruned.text.weight[pruned.text_index[unseen]], dropped)
    assert int(pruned.text_index[unseen]) == kept


def test_the_reserve_keeps_more_word_pieces_and_min_count_fewer(tok):
    model, spec = _student(tok)
    counts = shrink.token_counts(spec, [model.item_bag_ids])
    base = shrink.prune_vocabulary(model, spec, counts)[1].text_rows_kept
    assert shrink.prune_vocabulary(model, spec, counts, reserve=10)[1].text_rows_kept == base + 10
    assert shrink.prune_vocabulary(model, spec, counts, min_count=2)[1].text_rows_kept < base


def test_units_pruned_where_their_outgoing_weights_are_zero_change_nothing(tok):
    model, spec = _student(tok)
    with torch.no_grad():  # half of every prunable unit made dead, and small on the way in
        for mlp in (model.ctr_mlp, *model.classifiers.values()):
            mlp[3].weight[:, ::2] = 0
            mlp[0].weight[::2] *= 1e-3
        model.text_proj.weight[:, ::2] = 0
        model.text.weight[:, ::2] *= 1e-3
    pruned, pspec = shrink.prune_units(model, spec, 0.5)
    assert (pspec.ctr_hidden, pspec.class_hidden, pspec.text_dim) == (8, 8, 4)
    assert shrink.params(pruned) < shrink.params(model)
    _assert_close(_outputs(model, tok, spec), _outputs(pruned, tok, pspec))


@settings(max_examples=15, deadline=None)
@given(keep=st.floats(0.05, 1.0), fold=st.booleans(), vocab=st.booleans(), int8=st.booleans())
def test_every_compressed_shape_saves_loads_and_serves_as_it_scores(tok, tmp_path_factory, keep, fold, vocab, int8):
    model, spec = _student(tok)
    if vocab:
        model, spec = shrink.prune_vocabulary(model, spec, shrink.token_counts(spec, [model.item_bag_ids]))
    if fold:
        model, spec = shrink.fold_item_text(model, spec)
    model, spec = shrink.prune_units(model, spec, keep)
    state = model.state_dict()
    stored = quant.quantize_state(state) if int8 else quant.narrow_ints(state)
    assert all(t.dtype != torch.int64 for t in stored.values())
    back = S.from_state(spec, quant.dequantize_state(stored)).eval()
    if not int8:
        _assert_close(_outputs(model, tok, spec), _outputs(back, tok, spec))
    rt = StudentRuntime(back, tok, spec)
    for task in spec.classes:
        expected = _outputs(back, tok, spec)[task]
        torch.testing.assert_close(rt.text_logits(task, QUERIES), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rt.text_logits(task, QUERIES[:1]), expected[:1], rtol=1e-5, atol=1e-5)


def test_pruning_a_pruned_vocabulary_again_is_refused(tok):
    model, spec = _student(tok)
    counts = shrink.token_counts(spec, [model.item_bag_ids])
    pruned, pspec = shrink.prune_vocabulary(model, spec, counts)
    with pytest.raises(ValueError, match="already pruned"):
        shrink.prune_vocabulary(pruned, pspec, counts)


def test_a_compact_8bit_bundle_loads_as_it_was_written_and_is_refused_when_altered(tok, tmp_path):
    import pyarrow as pa
    from distillery.serving import bundle

    model, spec = _student(tok)
    model, spec = shrink.prune_vocabulary(model, spec, shrink.token_counts(spec, [model.item_bag_ids]))
    model, spec = shrink.fold_item_text(model, spec)
    stored = quant.quantize_state(model.state_dict())
    items = pa.table({"idx": list(range(2, 7)), "item_id": [f"i{k}" for k in range(5)], "title": ITEM_TEXTS,
                      "category": ["a", "b", "c", "c", "a"], "category_idx": [1, 2, 2, 0, 1], "clicks": [1] * 5})
    bundle.write(str(tmp_path / "b"), state=stored, config={"spec": spec.to_json(), "weights": "int8-rowwise"}, tokenizer=tok,
                 items=items, metrics={})
    loaded = bundle.load(str(tmp_path / "b"))
    assert loaded.spec == spec and loaded.spec.item_text is False
    in_memory = S.from_state(spec, quant.dequantize_state(stored)).eval()
    _assert_close(_outputs(in_memory, tok, spec), _outputs(loaded.model, tok, loaded.spec))
    weights = tmp_path / "b" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1
    weights.write_bytes(bytes(raw))
    with pytest.raises(bundle.BundleError, match="model.safetensors"):
        bundle.load(str(tmp_path / "b"))
    # a bundle written without the student's spec (an older distillery's) says to re-export
    bundle.write(str(tmp_path / "old"), state=stored, config={**spec.to_json(), "weights": "int8-rowwise"},
                 tokenizer=tok, items=items, metrics={})
    with pytest.raises(bundle.BundleError, match="no student spec.*re-export"):
        bundle.load(str(tmp_path / "old"))


def _intent_data(tok, n=24, seed=0):
    """n intent examples with labels and teacher logits, as the intent task's `tensors` makes them."""
    g = torch.Generator().manual_seed(seed)
    texts = [QUERIES[i % 4] + f" {i}" for i in range(n)]
    ids, offsets = text_bag(tok, texts, max_length=16, buckets=BUCKETS)
    return {"bag_values": ids, "bag_offsets": torch.cat([offsets, torch.tensor([len(ids)])]),
            "label": torch.arange(n) % 4,
            "teacher": torch.nn.functional.one_hot(torch.arange(n) % 4, 4) * 4.0 + torch.randn(n, 4, generator=g) * 0.5}


def test_the_unit_pruned_students_fine_tune_runs_the_shared_loop_lowers_the_loss_and_repeats(tok):
    from distillery.config import RunConfig
    from distillery.stages import compress, distill

    cfg = RunConfig.model_validate({"distill": {"lr": 0.03}})  # the fine-tune runs at 0.3 x this
    data = {"intent": _intent_data(tok)}

    def tuned(steps):
        pruned, _ = shrink.prune_units(_student(tok)[0], _student(tok)[1], 0.5)
        loss = compress.finetune(pruned, cfg, ["intent"], data, {"intent": 8}, steps, seed=3)
        with torch.no_grad():
            batch = distill._select(data["intent"], torch.arange(24), "cpu")
            after = distill.DistillLoss(pruned.eval(), cfg, ["intent"], kd=True)({"intent": batch})["total"]
        return pruned, loss, float(after)

    _, _, untrained = tuned(0)
    a, loss_a, after_a = tuned(100)
    b, loss_b, after_b = tuned(100)
    assert after_a < untrained * 0.5 and loss_a == pytest.approx(loss_b)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, msg=name)  # same seed, same steps: the same weights
    assert not a.training
