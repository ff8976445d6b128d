"""Config loading: every bad key or value fails at load time with a message naming it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from curate.config import Config, load_config
from curate.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_unknown_key_did_you_mean():
    with pytest.raises(
        ConfigError,
        match=r"config\.mine: unknown key 'num_negative'; did you mean 'num_negatives'\?",
    ):
        load_config(None, ["mine.num_negative=3"])


def test_unknown_section_did_you_mean(tmp_path):
    path = write(tmp_path, "mien:\n  top_k: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'mien'; did you mean 'mine'"):
        load_config(path)


def test_unknown_key_without_close_match_lists_known_keys():
    with pytest.raises(ConfigError, match="known keys: .*'use_gpu'"):
        load_config(None, ["index.zzzz=1"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("mine.num_negatives=abc", "config.mine.num_negatives: expected an integer, got 'abc'"),
        ("mine.num_negatives=true", "expected an integer, got True"),
        ("mine.num_negatives=2.5", "expected an integer, got 2.5"),
        ("mine.max_relative=high", "expected a number, got 'high'"),
        ("train.enabled=1", "config.train.enabled: expected true or false, got 1"),
        ("data.train_split=3", "expected a string, got 3"),
        ("mine=3", "config.mine: expected a mapping of keys, got 3"),
    ],
)
def test_wrong_type(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("mine.num_negatives=0", r"config\.mine\.num_negatives: 0 is out of range \[1, 1000\]"),
        ("mine.num_negatives=1001", r"1001 is out of range \[1, 1000\]"),
        ("mine.near_dup_threshold=1.5", r"1\.5 is out of range \[-1\.0, 1\.0\]"),
        ("batch.batch_size=1", r"1 is out of range \[2, 65536\]"),
        ("index.nprobe=0", r"0 is out of range \[1, None\]"),
        ("mine.calibrate_ceiling=2", r"config\.mine\.calibrate_ceiling: 2\.0 is out of range \[0\.0, 1\.0\]"),
        ("cluster.in_process_max=-1", r"config\.cluster\.in_process_max: -1 is out of range \[0, None\]"),
    ],
)
def test_out_of_range(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_literal_choice():
    with pytest.raises(
        ConfigError,
        match=r"config\.mine\.strategy: 'best' is not allowed; choose one of \['top', 'random'\]",
    ):
        load_config(None, ["mine.strategy=best"])
    assert load_config(None, ["mine.strategy=random"]).mine.strategy == "random"
    with pytest.raises(
        ConfigError,
        match=r"config\.cluster\.workers: 'threads' is not allowed; choose one of "
        r"\['auto', 'processes', 'in_process'\]",
    ):
        load_config(None, ["cluster.workers=threads"])


def test_overrides_apply_over_the_file(tmp_path):
    path = write(tmp_path, "seed: 5\nmine:\n  num_negatives: 9\n  top_k: 20\n")
    cfg = load_config(path, ["mine.num_negatives=3", "batch.drop_last=true"])
    assert cfg.mine.num_negatives == 3  # overridden
    assert cfg.mine.top_k == 20  # from the file
    assert cfg.seed == 5
    assert cfg.batch.drop_last is True
    assert cfg.mine.range_max == 100  # default


def test_override_values_parsed_as_yaml_scalars():
    cfg = load_config(None, ["mine.max_relative=1", "data.eval_split=null", "embed.query_prefix="])
    assert cfg.mine.max_relative == 1.0 and isinstance(cfg.mine.max_relative, float)
    assert cfg.data.eval_split is None
    assert cfg.embed.query_prefix == ""
    assert load_config(None, ["mine.max_relative=null"]).mine.max_relative is None


def test_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["mine.num_negatives"])
    path = write(tmp_path, "seed: 0\n")
    with pytest.raises(ConfigError, match="'seed' is a value, not a section"):
        load_config(path, ["seed.x=1"])


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_default_yaml_is_the_defaults_written_out():
    assert load_config(CONFIGS / "default.yaml") == Config(output_dir="runs/default")


def test_demo_yaml_loads():
    cfg = load_config(CONFIGS / "demo.yaml")
    assert cfg.data.path == "demo"
    assert (cfg.mine.num_negatives, cfg.mine.top_k, cfg.mine.range_max) == (4, 50, 50)
    assert (cfg.batch.batch_size, cfg.batch.same_topic) == (16, 0.5)
    assert (cfg.train.lr, cfg.train.chunk_size, cfg.train.max_length) == (3e-5, 8, 64)
    assert cfg.embed.max_length == 128


def test_python_tags_are_not_constructed(tmp_path):
    # An unsafe loader would call os.getcwd and hand back a valid string for output_dir, so the
    # load would succeed: only a safe loader raises here.
    path = write(tmp_path, "output_dir: !!python/object/apply:os.getcwd []\n")
    with pytest.raises((yaml.YAMLError, ConfigError)):
        load_config(path)
