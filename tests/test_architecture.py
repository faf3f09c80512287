"""The package's shape, checked: what may import what (ARCHITECTURE.md, "The map")."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "platform" / "distillery"
STAGES = {p.stem for p in (PKG / "stages").glob("*.py") if p.stem != "__init__"}


def _imports(path: Path) -> set[str]:
    """Absolute `distillery.` modules that `path` imports (relative imports resolved)."""
    package = ["distillery", *path.relative_to(PKG).parent.parts]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out |= {f"{mod}.{a.name}" for a in node.names} | {mod}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m.startswith("distillery")}


def _stages_imported(path: Path) -> set[str]:
    return {m.split(".")[2] for m in _imports(path) if m.startswith("distillery.stages.") and m.split(".")[2] in STAGES}


def test_the_stages_are_found():
    assert STAGES == {"prepare", "teacher", "label", "distill", "tune", "compress", "report"}


@pytest.mark.parametrize("package", ["models", "serving", "data"])
def test_models_serving_and_data_do_not_depend_on_any_stage(package):
    for path in (PKG / package).glob("*.py"):
        assert not _stages_imported(path), f"{path.relative_to(PKG)} imports a stage: {_stages_imported(path)}"


def test_a_stage_reads_other_stages_outputs_through_the_layout_not_their_modules():
    # tune and compress train and fine-tune with the distillation step, inputs and trainer that the
    # distill stage defines; nothing else crosses from one stage module into another
    allowed = {"tune": {"distill"}, "compress": {"distill"}}
    for stage in STAGES:
        got = _stages_imported(PKG / "stages" / f"{stage}.py") - {stage}
        assert got <= allowed.get(stage, set()), f"stages/{stage}.py imports {got}"


def test_the_import_checker_sees_relative_and_absolute_imports():
    assert "distillery.stages.distill" in _imports(PKG / "stages" / "tune.py")      # from . import distill
    assert "distillery.storage" in _imports(PKG / "serving" / "bundle.py")          # from .. import storage
    assert _stages_imported(PKG / "runner.py") == STAGES  # the stage table imports every stage
