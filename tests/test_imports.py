"""Every module imports on its own, as a Ray worker imports it: first, in a fresh interpreter.

An import cycle can hide in a test session (whatever imported first breaks the cycle) and then fail
in a Train worker that unpickles a function from the other end of it.
"""
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "platform" / "distillery"
MODULES = sorted(".".join(("distillery", *p.relative_to(PKG).with_suffix("").parts)).removesuffix(".__init__")
                 for p in PKG.rglob("*.py"))

# one interpreter: torch and the third-party modules load once; every distillery module is dropped
# from sys.modules before the next is imported, so each is imported first
SCRIPT = """
import importlib, sys
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "distillery" or m.startswith("distillery.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed.append(f"{name}: {type(exc).__name__}: {exc}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_the_module_list_covers_the_packages():
    assert {"distillery.stages.teacher", "distillery.models.teacher", "distillery.serving.app",
            "distillery.data.sources", "distillery.layout"} <= set(MODULES)


def test_every_module_imports_first_in_a_fresh_interpreter():
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *MODULES], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
