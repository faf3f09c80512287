"""The README's Results section is generated from benchmarks/results/*.json and matches them."""
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
