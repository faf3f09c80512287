"""The prepare stage end to end on a local Ray: outputs, manifest, skip/force, leakage, quarantine."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from distillery import runner, storage
from distillery.errors import DataError, StageError
from distillery.stages import prepare
from distillery.tasks import TASKS

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_local")]


def _read(path: Path) -> pd.DataFrame:
    return pq.read_table(path).to_pandas()


def test_manifest_contract(prepared):
    cfg, run_dir, m = prepared
    on_disk = json.loads((run_dir / "prepare" / "manifest.json").read_text())
    assert on_disk["config_hash"] == m["config_hash"] and m["status"] == "complete"
    assert set(m["counts"]) == {"users", "items", "interactions", "rejects"}
    assert m["counts"]["items"] == 80 and m["counts"]["users"] == 150 and m["counts"]["rejects"] == 0
    assert set(m["examples"]) == set(TASKS)
    assert set(m["examples"]["recommendation"]) == set(m["examples"]["ctr"]) == {"train", "valid", "test"}
    assert set(m["examples"]["intent"]) == {"train", "valid", "test", "transfer"}  # transfer: teacher-only texts
    assert m["wall_time_s"] > 0 and m["ctr_source"] == "impressions"
    for task, splits in m["examples"].items():
        for split, n in splits.items():
            assert len(_read(run_dir / "prepare" / "examples" / task / split)) == n


def test_outputs_and_vocabularies(prepared):
    _, run_dir, m = prepared
    out = run_dir / "prepare"
    items = _read(out / "items.parquet")
    assert items["idx"].tolist() == list(range(2, 2 + len(items)))  # 0 = pad, 1 = unknown
    assert items["item_id"].is_monotonic_increasing and items["text"].str.len().gt(0).all()
    cats = json.loads((out / "vocab" / "categories.json").read_text())
    assert cats[:2] == ["[PAD]", "[UNK]"] and (items["category_idx"] >= 2).all()
    users = json.loads((out / "vocab" / "users.json").read_text())
    assert len(users) == m["counts"]["users"] + 2
    labels = json.loads((out / "vocab" / "intent_labels.json").read_text())
    intent = _read(out / "examples" / "intent" / "train")
    assert intent["label"].between(0, len(labels) - 1).all()
    transfer = _read(out / "examples" / "intent" / "transfer")
    every = pd.concat([_read(out / "examples" / "intent" / s) for s in ("train", "valid", "test")])
    assert len(transfer) > 0 and (transfer["label"] == -1).all() and not set(transfer["text"]) & set(every["text"])
    assert len(_read(out / "interactions")) == m["counts"]["interactions"]


def test_sentiment_examples_are_the_reviews_classes_by_their_rating(prepared):
    from distillery.data.examples import normalize_text

    _, run_dir, m = prepared
    out = run_dir / "prepare"
    assert json.loads((out / "vocab" / "sentiment_labels.json").read_text()) == ["negative", "neutral", "positive"]
    reviews = _read(out / "reviews")
    classes = {}  # text -> its reviews' classes (1-2 stars negative, 3 neutral, 4-5 positive)
    for title, text, rating in zip(reviews["title"], reviews["text"], reviews["rating"]):
        classes.setdefault(normalize_text(f"{title}. {text}"), []).append(0 if rating <= 2 else 2 if rating >= 4 else 1)
    ex = pd.concat([_read(out / "examples" / "sentiment" / s) for s in ("train", "valid", "test")])
    assert ex["text"].is_unique and set(ex["text"]) == set(classes)  # every review is an example's
    assert int(ex["count"].sum()) == len(reviews) and m["sentiment"]["left_out"] == {"no_rating_or_text": 0}
    for text, label in zip(ex["text"], ex["label"]):  # the majority class of the text's reviews (ties: lowest)
        votes = np.bincount(classes[text], minlength=3)
        assert label == int(np.argmax(votes))
    assert set(ex["label"]) == {0, 1, 2} and ex["example_id"].str.startswith("sentiment:").all()


def test_no_leakage_across_splits(prepared):
    _, run_dir, _ = prepared
    ex = run_dir / "prepare" / "examples"
    rec = {s: _read(ex / "recommendation" / s) for s in ("train", "valid", "test")}
    test = rec["test"].set_index("user_id")
    assert test.index.is_unique  # one test example per user
    checked = 0
    for split in ("train", "valid"):
        for row in rec[split].itertuples(index=False):
            # every train/valid example lies strictly inside the user's prefix before the test target:
            # its history + target is a prefix of the test history (no truncation at this size)
            full = list(test.loc[row.user_id, "history"])
            seq = list(row.history) + [row.item]
            assert seq == full[: len(seq)] and len(seq) <= len(full), row.user_id
            checked += 1
    assert checked > 100
    intent = {s: set(_read(ex / "intent" / s)["text"]) for s in ("train", "valid", "test")}
    assert not (intent["train"] & intent["valid"]) and not (intent["train"] & intent["test"])
    assert not (intent["valid"] & intent["test"])
    ctr = pd.concat([_read(ex / "ctr" / s) for s in ("train", "valid", "test")])
    assert ctr["example_id"].is_unique and set(ctr["label"]) == {0, 1}


def test_rerun_skips_and_force_redoes(prepared, capsys):
    cfg, run_dir, m = prepared
    again = runner.run(cfg, ["prepare"])["prepare"]
    assert again["created"] == m["created"] and "up to date" in capsys.readouterr().out
    # a loss-only change (temperature) must not invalidate prepare
    hot = cfg.model_copy(deep=True)
    hot.tasks.intent.temperature = 7.0
    assert runner.run(hot, ["prepare"])["prepare"]["created"] == m["created"]
    forced = runner.run(cfg, ["prepare"], force=True)["prepare"]
    assert forced["examples"] == m["examples"] and forced["counts"] == m["counts"]  # deterministic


def test_the_same_files_by_a_relative_or_an_absolute_path_are_one_input(prepared, tmp_path, monkeypatch, capsys):
    cfg, run_dir, _ = prepared
    data = Path(prepare.synthetic_dir(cfg))
    files = {k: data / f"{k}.parquet" for k in ("items", "interactions", "reviews")}
    native = cfg.model_copy(update={"run_dir": str(tmp_path / "run"), "data": cfg.data.model_copy(
        update={"format": "native", **{k: str(v) for k, v in files.items()}})})
    first = runner.run(native, ["prepare"])["prepare"]
    monkeypatch.chdir(data.parent)
    relative = native.model_copy(update={"data": native.data.model_copy(
        update={k: os.path.relpath(v) for k, v in files.items()})})
    assert not relative.data.items.startswith("/")
    assert runner.run(relative, ["prepare"])["prepare"]["created"] == first["created"]
    assert "up to date" in capsys.readouterr().out


def test_a_fresh_mtime_keeps_prepare_and_new_content_redoes_it(prepared, tmp_path, capsys):
    # a re-mounted or re-synced copy of the same data has fresh mtimes: its finished stages stay
    cfg, run_dir, _ = prepared
    data = tmp_path / "data"
    shutil.copytree(prepare.synthetic_dir(cfg), data)
    native = cfg.model_copy(update={"run_dir": str(tmp_path / "run"), "data": cfg.data.model_copy(
        update={"format": "native", **{k: str(data / f"{k}.parquet") for k in ("items", "interactions", "reviews")}})})
    first = runner.run(native, ["prepare"])["prepare"]
    items = data / "items.parquet"
    os.utime(items, ns=(items.stat().st_atime_ns, items.stat().st_mtime_ns + 10**9))
    assert runner.run(native, ["prepare"])["prepare"]["created"] == first["created"]
    assert "up to date" in capsys.readouterr().out
    table = pq.read_table(items)
    pq.write_table(table.slice(1), items)  # one item fewer: new content
    assert runner.run(native, ["prepare"])["prepare"]["created"] != first["created"]


def test_fingerprint_is_content_below_the_limit_and_mtime_above_it(tmp_path, monkeypatch):
    f = tmp_path / "d" / "a.bin"
    f.parent.mkdir()
    f.write_bytes(b"abcd")
    before = storage.fingerprint(str(f.parent))
    os.utime(f, ns=(0, 10**9))
    assert storage.fingerprint(str(f.parent)) == before and before["identity"] == "content"
    f.write_bytes(b"abce")  # same size, new bytes
    assert storage.fingerprint(str(f.parent))["sha256"] != before["sha256"]
    monkeypatch.setattr(storage, "CONTENT_FINGERPRINT_MAX_BYTES", 3)
    big = storage.fingerprint(str(f))
    os.utime(f, ns=(0, 2 * 10**9))
    assert big["identity"] == "mtime" and storage.fingerprint(str(f))["sha256"] != big["sha256"]
    assert storage.fingerprint(str(tmp_path / "missing")) == {"path": str(tmp_path / "missing"), "exists": False}


def test_stage_names_are_checked():
    with pytest.raises(StageError, match="unknown stage"):
        runner.parse_stages("prepare,train")
    assert runner.parse_stages("label,prepare") == ["prepare", "label"]  # pipeline order
    assert runner.parse_stages("report,compress,tune") == ["tune", "compress", "report"]
    assert runner.parse_stages(None) == list(runner.STAGES)  # every stage is available
    for empty in ("", ",", " , "):  # a typo must not run the whole pipeline
        with pytest.raises(StageError, match="names no stage"):
            runner.parse_stages(empty)


def test_an_absent_input_is_named_by_its_key_before_ray_starts_or_old_output_goes(tiny_config, tmp_path, monkeypatch):
    import pyarrow as pa

    pq.write_table(pa.table({"user_id": ["u"], "item_id": ["i"], "timestamp": [1]}), tmp_path / "interactions.parquet")
    cfg = tiny_config("data.format=native", f"data.items={tmp_path / 'nope' / 'items.parquet'}",
                      f"data.interactions={tmp_path / 'interactions.parquet'}")
    earlier = Path(cfg.run_dir) / "prepare" / "manifest.json"
    earlier.parent.mkdir(parents=True)
    earlier.write_text("{}")
    monkeypatch.setattr(runner, "init_ray", lambda: pytest.fail("Ray was started"))
    with pytest.raises(DataError, match=r"^data\.items: .*/nope/items\.parquet does not exist: check the path"):
        runner.run(cfg, ["prepare"])
    assert earlier.exists()
    with pytest.raises(StageError, match="no stage to run"):
        runner.run(cfg, [])


def _planted(tmp_path, tiny_config):
    """Generated data written as native files, plus bad rows of several kinds."""
    from distillery.data.synthetic import generate

    cfg = tiny_config()
    t = generate(cfg.data.synthetic)
    inter = t["interactions"].to_pandas()
    bad = pd.DataFrame([
        {**inter.iloc[0].to_dict(), "user_id": None},
        {**inter.iloc[1].to_dict(), "item_id": "no-such-item"},
        inter.iloc[2].to_dict(),  # exact duplicate
        {**inter.iloc[3].to_dict(), "clicked": 7},
    ])
    path = tmp_path / "log"
    path.mkdir()
    inter.to_parquet(path / "a.parquet")
    bad.to_parquet(path / "b.parquet")
    t["items"].to_pandas().to_parquet(tmp_path / "items.parquet")
    reviews = t["reviews"].to_pandas()
    reviews.loc[0, "rating"] = 11
    reviews.to_parquet(tmp_path / "reviews.parquet")
    return len(inter), len(bad), len(reviews), [
        "data.format=native", f"data.interactions={path}", f"data.items={tmp_path / 'items.parquet'}",
        f"data.reviews={tmp_path / 'reviews.parquet'}"]


def test_quarantine_accounts_for_every_row(tmp_path, tiny_config):
    n_good, n_bad, n_reviews, overrides = _planted(tmp_path, tiny_config)
    cfg = tiny_config(*overrides)
    m = runner.run(cfg, ["prepare"])["prepare"]
    assert m["counts"]["interactions"] == n_good and m["counts"]["rejects"] == n_bad + 1
    assert m["rejects_by_reason"] == {"null_id": 1, "unknown_item": 1, "duplicate": 1, "clicked_not_binary": 1,
                                      "rating_out_of_range": 1}
    rejects = _read(Path(cfg.run_dir) / "prepare" / "rejects")
    assert len(rejects) == n_bad + 1 and rejects["source"].str.endswith(("b.parquet", "reviews.parquet")).all()
    assert m["input_rows"] == {"items": 80, "interactions": n_good + n_bad, "reviews": n_reviews}


def test_reject_ceiling_names_file_column_and_reason(tmp_path, tiny_config):
    _, _, _, overrides = _planted(tmp_path, tiny_config)
    cfg = tiny_config(*overrides, "data.max_reject_fraction=0.0")
    with pytest.raises(DataError) as err:
        runner.run(cfg, ["prepare"])
    msg = str(err.value)
    assert "above data.max_reject_fraction=0.0" in msg and "b.parquet" in msg and "column" in msg
    assert not (Path(cfg.run_dir) / "prepare" / "manifest.json").exists()  # failed stage leaves no manifest
    assert (Path(cfg.run_dir) / "prepare" / "rejects").exists()  # ...but keeps the rejects to look at


def test_the_groupby_shuffle_is_set_on_the_stages_datasets_not_the_process():
    """data.shuffle reaches the groupby it is meant for; the process-wide DataContext, which other
    work in the same driver reads, keeps its own strategy, and a dataset made elsewhere is unaffected."""
    import ray
    from distillery.data.sources import group_by

    before = ray.data.DataContext.get_current().shuffle_strategy
    assert before.value != "sort_shuffle_pull_based"  # else this test could not tell the two apart

    def rows():
        return ray.data.range(200).map_batches(lambda b: {"k": b["id"] % 5, "v": b["id"]})

    def operators(ds):
        return " ".join(line for line in ds.stats().splitlines() if line.startswith("Operator"))

    scoped = group_by(rows(), "k", "sort_shuffle_pull_based", num_partitions=2).map_groups(lambda g: g).materialize()
    other = rows().groupby("k", num_partitions=2).map_groups(lambda g: g).materialize()
    assert "Sort" in operators(scoped) and "HashShuffle" not in operators(scoped)
    assert "Sort" not in operators(other)
    assert ray.data.DataContext.get_current().shuffle_strategy == before
    assert scoped.count() == other.count() == 200
