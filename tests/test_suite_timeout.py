"""The suite's own timeout (tests/conftest.py): a test stuck past the limit ends the run, and the
output names it, shows where it waits and says what Ray is doing."""
from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT


def test_a_stuck_test_ends_the_run_naming_itself_where_it_waits_and_rays_state(tmp_path):
    (tmp_path / "test_stuck.py").write_text(
        "import time\n\n"
        "def test_fine():\n    pass\n\n"
        "def wait_forever():\n    time.sleep(600)\n\n"
        "def test_stuck():\n    wait_forever()\n\n"
        "def test_never_reached():\n    pass\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "--timeout", "3",
                          "-v", str(tmp_path / "test_stuck.py")], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert "test_fine PASSED" in out and "test_never_reached" not in out
    assert "Timeout: test_stuck.py::test_stuck ran past 3 s" in out
    assert "in wait_forever" in out  # the stuck frame, innermost last
    assert "Ray is not running" in out
