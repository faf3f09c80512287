"""The suite's own timeout (tests/conftest.py): a test stuck past the limit ends the run, and the
output names it, shows where it waits and says what Ray is doing."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

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
    # CI keeps only the tail of a failed run: Ray's state, then the stuck frame, then the test's name
    tail = out.splitlines()[-20:]
    lines = [next(i for i, line in enumerate(tail) if text in line)
             for text in ("Ray is not running", "in test_stuck", "in wait_forever",
                          "Timeout: test_stuck.py::test_stuck ran past 3 s")]
    assert lines == sorted(lines), "\n".join(tail)


@pytest.mark.integration
def test_rays_state_names_resources_live_actors_and_placement_groups(ray_local):
    import ray
    from conftest import ray_state
    from ray.util.placement_group import placement_group, remove_placement_group

    @ray.remote(num_cpus=0)
    class Waiter:
        def ping(self):
            return 1

    waiter = Waiter.remote()
    ray.get(waiter.ping.remote())
    group = placement_group([{"CPU": 0.25}])
    ray.get(group.ready())
    try:
        lines = ray_state().splitlines()
    finally:
        remove_placement_group(group)
        ray.kill(waiter)
    assert len(lines) == 4, lines
    assert lines[0].startswith("  available") and "CPU" in lines[0]
    assert "Waiter ALIVE x1" in lines[2]
    assert "CREATED [{'CPU': 0.25}]" in lines[3]
