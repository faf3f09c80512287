import pytest

from distillery.config import RunConfig, load_config, parse_override, stable_hash
from distillery.errors import ConfigError

from conftest import ROOT


def test_shipped_configs_load():
    demo = load_config(ROOT / "configs" / "demo.yaml")
    assert demo.data.format == "synthetic" and demo.run_dir == "runs/demo"
    office = load_config(ROOT / "configs" / "amazon.yaml", ["data.interactions=a.parquet", "data.items=b.parquet"])
    assert office.data.format == "native" and office.data.items == "b.parquet"


def test_every_config_starts_with_the_command_that_runs_it():
    for path in (ROOT / "configs").glob("*.yaml"):
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and ("distillery run" in first or "make" in first), path


def test_overrides_parse_yaml_values():
    cfg = load_config(None, ["data.synthetic.users=42", "teacher.use_gpu=true", "compress.unit_keep=[0.1, 0.2]",
                             "run_dir=/tmp/x"])
    assert cfg.data.synthetic.users == 42 and cfg.teacher.use_gpu is True
    assert cfg.compress.unit_keep == [0.1, 0.2] and cfg.run_dir == "/tmp/x"


def test_unknown_key_names_the_key_and_suggests():
    with pytest.raises(ConfigError, match=r"data\.synthetic\.userz: unknown key; did you mean 'users'"):
        load_config(None, ["data.synthetic.userz=5"])
    with pytest.raises(ConfigError, match=r"datta: unknown key; did you mean 'data'"):
        load_config(None, ["datta.format=native"])


def test_an_error_from_an_override_names_the_override_not_only_the_file(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("data:\n  format: synthetic\n")
    with pytest.raises(ConfigError) as err:
        load_config(good, ["distill.epocs=3", "data.max_reject_fraction=2", "run_dir="])
    lines = str(err.value).splitlines()
    assert lines[0] == f"invalid config ({good}):"
    assert any(x.startswith("  distill.epocs: unknown key") and x.endswith("[from the override distill.epocs=3]")
               for x in lines)
    assert any("data.max_reject_fraction" in x and x.endswith("[from the override data.max_reject_fraction=2]")
               for x in lines)
    assert any(x.startswith("  run_dir:") and "at least 1 character" in x for x in lines)  # not the current folder
    # an error the file itself holds carries no such mark
    good.write_text("data:\n  format: parquet-ish\n")
    with pytest.raises(ConfigError) as err:
        load_config(good, ["seed=1"])
    assert "data.format" in str(err.value) and "[from the override" not in str(err.value)


def test_wrong_type_names_key_and_expectation():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.max_reject_fraction=lots"])
    assert "data.max_reject_fraction" in str(err.value) and "valid number" in str(err.value)
    with pytest.raises(ConfigError, match=r"data\.max_reject_fraction: Input should be less than or equal to 1"):
        load_config(None, ["data.max_reject_fraction=2"])


def test_yaml_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  format: parquet-ish\n")
    with pytest.raises(ConfigError, match=r"data\.format: Input should be 'synthetic'"):
        load_config(bad)
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_real_data_formats_require_paths():
    with pytest.raises(ConfigError, match=r"data\.interactions is required for data.format=native"):
        load_config(None, ["data.format=native", "data.items=x.parquet"])


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_override("data.synthetic.users")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(None, ["seed=1", "seed.x=2"])


def test_intent_split_fractions_validated():
    with pytest.raises(ConfigError, match="split_fractions"):
        load_config(None, ["tasks.intent.split_fractions=[0.5, 0.5, 0.5]"])


def test_stable_hash_ignores_key_order():
    a = RunConfig()
    assert stable_hash(a) == stable_hash(RunConfig.model_validate(a.model_dump()))
    assert stable_hash({"a": 1, "b": 2}) == stable_hash({"b": 2, "a": 1})
    assert stable_hash(a) != stable_hash(load_config(None, ["seed=1"]))


def test_a_sasrec_width_the_heads_do_not_divide_is_refused_at_load():
    with pytest.raises(ConfigError, match=r"teacher\.sasrec\.dims \[30\] must be multiples of teacher\.sequence\.heads=4"):
        load_config(ROOT / "configs" / "demo.yaml", ["teacher.sequence.heads=4", "teacher.sequence.dims=[64]",
                                                      "teacher.sasrec.dims=[64,30]"])


def test_the_teacher_grid_is_validated_at_load():
    with pytest.raises(ConfigError, match=r"dims \[30\]: each width must be >= 8 and a multiple of heads=4"):
        load_config(None, ["teacher.sequence.heads=4", "teacher.sequence.dims=[64, 30]", "teacher.sasrec.dims=[64]"])
    with pytest.raises(ConfigError, match="dropouts must lie in"):
        load_config(None, ["teacher.sequence.dropouts=[0.3, 1.0]"])
    with pytest.raises(ConfigError, match="raise members"):
        load_config(None, ["teacher.sequence.dims=[64, 64]"])
    with pytest.raises(ConfigError, match="at least one value"):
        load_config(None, ["teacher.sequence.dropouts=[]"])
    assert load_config(None, ["teacher.sequence.dims=[32]"]).teacher.sequence.dims == [32]
