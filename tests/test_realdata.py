"""The prepare stage on the real Amazon 2014 Office data from ../shared/data (skipped when absent)."""
from pathlib import Path

import pandas as pd
import pytest

from conftest import ROOT
from distillery import runner
from distillery.config import load_config

pytestmark = [pytest.mark.integration, pytest.mark.realdata, pytest.mark.usefixtures("ray_local")]


def _office(shared_data: Path) -> Path:
    path = shared_data / "amazon14_office_products_lcrec"
    if not (path / "interactions.parquet").exists():
        pytest.skip(f"{path} is absent")
    return path


def test_office_counts(shared_data, tmp_path):
    office = _office(shared_data)
    cfg = load_config(ROOT / "configs" / "amazon.yaml", [
        f"data.interactions={office / 'interactions.parquet'}", f"data.items={office / 'items.parquet'}",
        f"run_dir={tmp_path}"])
    m = runner.run(cfg, ["prepare"])["prepare"]
    assert m["counts"] == {"users": 4905, "items": 2420, "interactions": 53258, "rejects": 0}
    assert m["examples"]["recommendation"]["test"] == 4905
    assert m["ctr_source"].startswith("sampled_negatives")


def test_office_with_three_planted_bad_rows(shared_data, tmp_path):
    office = _office(shared_data)
    df = pd.read_parquet(office / "interactions.parquet")
    bad = pd.DataFrame([{"user_id": None, "item_id": "5", "position": 99, "loo_split": "train"},
                        {"user_id": "0", "item_id": "no-such-item", "position": 100, "loo_split": "train"}])
    pd.concat([df, bad, df.iloc[[10]]], ignore_index=True).to_parquet(tmp_path / "log.parquet", index=False)
    cfg = load_config(ROOT / "configs" / "amazon.yaml", [
        f"data.interactions={tmp_path / 'log.parquet'}", f"data.items={office / 'items.parquet'}",
        f"run_dir={tmp_path / 'run'}"])
    m = runner.run(cfg, ["prepare"])["prepare"]
    assert m["counts"]["rejects"] == 3 and m["counts"]["interactions"] == 53258
    assert m["rejects_by_reason"] == {"null_id": 1, "unknown_item": 1, "duplicate": 1}
