"""The README's Results section is generated from benchmarks/results/*.json and matches them."""
import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import render  # noqa: E402


def test_the_readme_results_match_the_json_files(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["render.py", "--check"])
    assert render.main() == 0, capsys.readouterr().out


def test_rendering_rewrites_only_between_the_markers_and_follows_the_json(tmp_path, monkeypatch):
    results = tmp_path / "results"
    shutil.copytree(ROOT / "benchmarks" / "results", results)
    serve = json.loads((results / "serve.json").read_text())
    next(r for r in serve["results"]["serve-student"]["ctr"] if r["clients"] == 8)["p50_ms"] = 1234.5
    (results / "serve.json").write_text(json.dumps(serve))
    (results / "prepare.json").unlink()
    monkeypatch.setattr(render, "RESULTS", results)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{render.BEGIN}\nstale\n{render.END}\noutro\n")
    monkeypatch.setattr(sys, "argv", ["render.py", "--readme", str(readme), "--check"])
    assert render.main() == 1
    monkeypatch.setattr(sys, "argv", ["render.py", "--readme", str(readme)])
    assert render.main() == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "stale" not in text
    assert "| 1234.5 / " in text  # the edited cell
    assert "No `results/prepare.json` yet: run `python benchmarks/prepare.py`" in text
    monkeypatch.setattr(sys, "argv", ["render.py", "--readme", str(readme), "--check"])
    assert render.main() == 0


def test_a_quality_run_reuses_an_earlier_runs_seeds_only_when_made_alike(tmp_path, monkeypatch, capsys):
    import quality  # benchmarks/quality.py

    from distillery.config import load_config

    def office(*overrides):
        return quality.recipe_hash(load_config(ROOT / "configs" / "amazon.yaml", ["data.interactions=/d/i.parquet",
                                                                                 "data.items=/d/items.parquet", *overrides]))

    recipe = office()
    # the seed, run directory and the settings of stages that do not change the models are not the recipe
    assert office("seed=3", "run_dir=/x", "report.bootstrap=200", "tune.num_samples=2") == recipe
    assert office("student.dim=64") != recipe and office("data.items=/e/items.parquet") != recipe
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"config": "/elsewhere/configs/amazon.yaml", "overrides": [],
                               "per_seed": {"0": {"recipe": recipe, "test": {}}, "1": {"recipe": recipe}}}))
    args = argparse.Namespace(reuse=str(old), config="configs/amazon.yaml", overrides=[])
    assert quality.reusable_seeds(args, recipe) == {0: {"recipe": recipe, "test": {}}, 1: {"recipe": recipe}}
    assert quality.reusable_seeds(argparse.Namespace(reuse=None, config="x", overrides=[]), recipe) == {}
    args.overrides = ["student.dim=64"]
    assert quality.reusable_seeds(args, "another") is None
    assert "seed(s) 0, 1 were made with another recipe" in capsys.readouterr().out
    old.write_text(json.dumps({"per_seed": {"0": {"test": {}}}}))  # a file from before seeds had recipes
    assert quality.reusable_seeds(args, recipe) is None and "seed(s) 0 were made" in capsys.readouterr().out
    old.write_text("[]")
    assert quality.reusable_seeds(argparse.Namespace(reuse=str(old), config="configs/amazon.yaml", overrides=[]), recipe) is None
    assert "not a results file of this benchmark" in capsys.readouterr().out
    # the README says which seeds came from where
    results = tmp_path / "results"
    shutil.copytree(ROOT / "benchmarks" / "results", results)
    q = json.loads((results / "quality_office.json").read_text())
    q["reused"] = {"file": str(old), "seeds": [q["seeds"][0]]}
    (results / "quality_office.json").write_text(json.dumps(q))
    monkeypatch.setattr(render, "RESULTS", results)
    assert f"seed {q['seeds'][0]} taken from an earlier run's results (`old.json`)" in render.quality()
