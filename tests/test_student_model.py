"""The student network: shapes, empty histories, the text bag, save and load."""
import pytest
import torch
from distillery.models.student import Student, text_bag
from distillery.models.teacher import load_backbone


@pytest.fixture(scope="module")
def tok(tiny_bert):
    return load_backbone(tiny_bert)[1]


def _student(tok, **kw):
    texts = ["", "", "red gel pen", "bike helmet mips", "espresso beans dark roast", "stapler"]
    ids, offsets = text_bag(tok, texts, max_length=16, buckets=kw.get("ngram_buckets", 256))
    torch.manual_seed(0)
    return Student(vocab_size=tok.vocab_size, n_items=6, n_categories=3, classes={"intent": 4, "sentiment": 3},
                   item_category=torch.tensor([0, 1, 2, 2, 0, 1]), item_bag_ids=ids, item_bag_offsets=offsets,
                   dim=16, text_dim=8, ngram_buckets=kw.get("ngram_buckets", 256), max_history=5,
                   heads=2, history_layers=kw.get("layers", 1)).eval()


def test_text_bag_is_word_pieces_then_ngrams_past_the_vocabulary(tok):
    ids, offsets = text_bag(tok, ["Bike helmet", ""], max_length=16, buckets=100)
    pieces = tok(["Bike helmet"], add_special_tokens=False)["input_ids"][0]
    assert offsets.tolist() == [0, len(ids)]  # the empty text is an empty bag at the end
    assert ids[:len(pieces)].tolist() == pieces
    assert all(tok.vocab_size <= i < tok.vocab_size + 100 for i in ids[len(pieces):].tolist())
    ids0, _ = text_bag(tok, ["Bike helmet"], max_length=16, buckets=0)
    assert ids0.tolist() == pieces


@pytest.mark.parametrize("layers", [0, 1])
def test_heads_have_the_documented_shapes_and_empty_histories_are_finite(tok, layers):
    m = _student(tok, layers=layers)
    hist = torch.tensor([[0, 0, 2, 3, 4], [0, 0, 0, 0, 0]])  # the second user has no history
    scores = m.rec_scores(hist)
    assert scores.shape == (2, 6) and torch.isinf(scores[:, :2]).all() and torch.isfinite(scores[:, 2:]).all()
    users, weights = m.user_vectors(hist, m.item_vectors())
    assert torch.allclose(weights[0].sum(), torch.tensor(1.0)) and (weights[0, :2] == 0).all()
    assert (weights[1] == 0).all() and torch.isfinite(users).all()
    assert m.ctr_logits(hist, torch.tensor([5, 2]), torch.tensor([0, -1])).shape == (2,)
    ids, offsets = text_bag(tok, ["red pen", "helmet", ""], max_length=16, buckets=256)
    assert m.class_logits("intent", ids, offsets).shape == (3, 4)
    assert m.class_logits("sentiment", ids, offsets).shape == (3, 3)


def test_padding_does_not_change_a_users_scores(tok):
    m = _student(tok)
    short = m.rec_scores(torch.tensor([[2, 3]]))
    padded = m.rec_scores(torch.tensor([[0, 0, 0, 2, 3]]))
    assert torch.allclose(short[:, 2:], padded[:, 2:], atol=1e-5)


def test_save_and_load_give_the_same_outputs(tok, tmp_path):
    from distillery import evaluation
    from distillery.models import student as S

    m = _student(tok)
    spec = S.StudentSpec(n_items=6, n_categories=3, classes={"intent": tuple("abcd"), "sentiment": tuple("xyz")},
                         vocab_size=tok.vocab_size,
                         dim=16, text_dim=8, ngram_buckets=256, heads=2, layers=1, dropout=0.1,
                         max_history=5, ctr_history=5, max_length=16, tasks=("recommendation", "ctr", "intent"))
    S.save(m, tok, spec, str(tmp_path / "s"))
    assert sorted(p.name for p in (tmp_path / "s").iterdir() if not p.name.startswith("tokenizer") and
                  p.name not in ("special_tokens_map.json", "vocab.txt")) == ["model.safetensors", "student.json"]
    loaded, tok2, spec2 = S.load(str(tmp_path / "s"))
    hist = torch.tensor([[0, 2, 3, 4, 5]])
    assert torch.allclose(loaded.rec_scores(hist), m.rec_scores(hist))
    p = evaluation.student_predictors(loaded, tok2, spec2, ["intent"])
    assert list(p) == ["intent"] and p["intent"](["red pen", "stapler"]).shape == (2,)
    assert spec2 == spec and not any(f.suffix in (".pt", ".pkl", ".bin") for f in (tmp_path / "s").iterdir())


def test_init_from_teacher_projects_item_vectors_and_word_pieces(tok):
    """Items: a truncated SVD keeps the teacher's item-item dot products as well as the student's
    width can (exactly when the teacher's vectors fit in it); word pieces: rows rescaled, n-grams kept."""
    from distillery.models import student as S

    m = _student(tok)
    ngrams = m.text.weight[tok.vocab_size:].clone()
    torch.manual_seed(1)
    low_rank = torch.randn(6, 4) @ torch.randn(4, 32)  # rank 4 < the student's 16 dims
    words = torch.randn(tok.vocab_size, 32)
    S.init_from_teacher(m, {"items": low_rank, "word_pieces": words})
    item = m.item.weight.detach()
    assert torch.allclose(item @ item.T, low_rank @ low_rank.T, atol=1e-3)
    assert torch.equal(m.text.weight[tok.vocab_size:], ngrams)
    rows = m.text.weight[:tok.vocab_size].detach()
    assert rows.std().item() == pytest.approx(ngrams.std().item(), rel=1e-3)
    # a teacher of another catalogue size leaves the item table alone
    before = m.item.weight.detach().clone()
    S.init_from_teacher(m, {"items": torch.randn(9, 32)})
    assert torch.equal(m.item.weight, before)
