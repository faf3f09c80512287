import pytest
import torch

from distillery.errors import DistilleryError
from distillery.teacher_model import Teacher, load_backbone, mean_pool, pad_histories


@pytest.fixture
def teacher(tiny_bert):
    backbone, tok = load_backbone(tiny_bert)
    torch.manual_seed(0)
    model = Teacher(backbone, n_items=12, n_intents=3, item_category=torch.arange(12) % 4, n_categories=4,
                    dim=16, max_history=5)
    return model.eval(), tok


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
    assert model.intent_logits(enc["input_ids"], enc["attention_mask"]).shape == (2, 3)
    hist = pad_histories([[2, 3], []], 5)  # an empty history must still give a user vector
    scores = model.rec_scores(hist)
    assert scores.shape == (2, 12) and torch.isinf(scores[:, :2]).all() and torch.isfinite(scores[:, 2:]).all()
    logits = model.ctr_logits(hist, torch.tensor([4, 5]), torch.tensor([0, -1]))
    assert logits.shape == (2,) and torch.isfinite(logits).all()


def test_refresh_items_encodes_every_item_text(teacher):
    model, tok = teacher
    texts = [f"item {k}" for k in range(10)]
    enc = tok(texts, padding=True, return_tensors="pt")
    model.refresh_items([(torch.arange(10) + 2, enc["input_ids"], enc["attention_mask"])])
    assert (model.item_text[2:].abs().sum(1) > 0).all() and (model.item_text[:2] == 0).all()


def test_rec_gradient_reaches_the_towers(teacher):
    model, _ = teacher
    model.train()
    model.item_text.normal_()
    loss = torch.nn.functional.cross_entropy(model.rec_scores(pad_histories([[2, 3]], 5)), torch.tensor([4]))
    loss.backward()
    assert model.item_tower[0].weight.grad.abs().sum() > 0 and model.user_tower.user_token.grad is not None


def test_unloadable_teacher_names_the_path(tmp_path):
    with pytest.raises(DistilleryError, match="not a folder with a Hugging Face model"):
        load_backbone(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(DistilleryError, match=f"cannot load the teacher from {tmp_path}"):
        load_backbone(str(tmp_path))
