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
        match=r"^--set mine\.num_negative=3: unknown key 'num_negative' in mine; "
        r"did you mean 'num_negatives'\?$",
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
        ("mine.num_negatives=abc", "--set mine.num_negatives=abc: expected an integer, got 'abc'"),
        ("mine.num_negatives=true", "expected an integer, got True"),
        ("mine.num_negatives=2.5", "expected an integer, got 2.5"),
        ("mine.max_relative=high", "expected a number, got 'high'"),
        ("train.enabled=1", "--set train.enabled=1: expected true or false, got 1"),
        ("data.train_split=3", "expected a string, got 3"),
        ("mine=3", "--set mine=3: expected a mapping of keys, got 3"),
    ],
)
def test_wrong_type(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("mine.num_negatives=0", r"--set mine\.num_negatives=0: 0 is out of range \[1, 1000\]"),
        ("mine.num_negatives=1001", r"1001 is out of range \[1, 1000\]"),
        ("mine.near_dup_threshold=1.5", r"1\.5 is out of range \[-1\.0, 1\.0\]"),
        ("batch.batch_size=1", r"1 is out of range \[2, 65536\]"),
        ("index.nprobe=0", r"0 is out of range \[1, None\]"),
        ("mine.calibrate_ceiling=2", r"calibrate_ceiling=2: 2\.0 is out of range \[0\.0, 1\.0\]"),
        ("cluster.in_process_max=-1", r"in_process_max=-1: -1 is out of range \[0, None\]"),
    ],
)
def test_out_of_range(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_literal_choice():
    with pytest.raises(
        ConfigError,
        match=r"--set mine\.strategy=best: 'best' is not allowed; choose one of \['top', "
              r"'random'\]",
    ):
        load_config(None, ["mine.strategy=best"])
    assert load_config(None, ["mine.strategy=random"]).mine.strategy == "random"
    with pytest.raises(
        ConfigError,
        match=r"--set cluster\.workers=threads: 'threads' is not allowed; choose one of "
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


# --- where a bad value came from: the --set that set it, or the file ---------------------------


def test_set_errors_name_the_set_not_the_file():
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / "demo.yaml", ["batch.batch_size=-4"])
    assert str(info.value) == "--set batch.batch_size=-4: -4 is out of range [2, 65536]"


def test_file_errors_name_the_file_and_the_key(tmp_path):
    path = write(tmp_path, "batch:\n  batch_size: -4\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["mine.top_k=20"])  # a valid --set is not blamed
    assert str(info.value) == f"{path}: batch.batch_size: -4 is out of range [2, 65536]"
    path = write(tmp_path, "mien:\n  top_k: 3\n")
    with pytest.raises(ConfigError, match=rf"^{path}: unknown key 'mien'"):
        load_config(path)


def test_set_over_a_list_value_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"^--set fncheck\.band=\[0\.9, 0\.5\]: .*lo <= hi"):
        load_config(None, ["fncheck.band=[0.9, 0.5]"])


def test_dict_configs_with_overrides_name_the_set():
    from curate import api

    tree = {"batch": {"batch_size": 16}}
    with pytest.raises(ConfigError, match=r"^--set batch\.batch_size=1: 1 is out of range"):
        api.as_config(tree, ["batch.batch_size=1"])
    assert tree == {"batch": {"batch_size": 16}}  # the caller's mapping is not changed


# --- settings that must agree (curate.config_rules) ----------------------------------------------


@pytest.mark.parametrize(
    "sets, keys",
    [
        (["mine.top_k=5", "mine.num_negatives=10"], ("mine.num_negatives", "mine.top_k")),
        (["mine.range_min=60", "mine.range_max=50"], ("mine.range_min", "mine.range_max")),
        (
            ["mine.range_min=60", "mine.top_k=50", "mine.range_max=200"],
            ("mine.range_min", "mine.top_k"),
        ),  # the window starts past the search depth
        (["mine.range_min=95", "mine.num_negatives=7"], ("mine.num_negatives", "mine.range_min")),
        (["mine.range_max=5", "mine.num_negatives=6"], ("mine.num_negatives", "mine.range_max")),
    ],
)
def test_impossible_combinations_fail_naming_both_keys(sets, keys):
    with pytest.raises(ConfigError) as info:
        load_config(None, sets)
    err = str(info.value)
    named = [s for s in sets if s.split("=")[0] in keys]
    assert all(f"--set {s}" in err.split(": ")[0] for s in named), err  # the sources, first
    assert all(k in err for k in keys), err
    assert any(w in err for w in ("lower", "raise", "set ")), err  # and the fix
    assert set(keys) <= set(info.value.keys)


def test_impossible_combination_in_a_file_names_the_file(tmp_path):
    path = write(tmp_path, "mine:\n  range_max: 50\n")
    with pytest.raises(ConfigError, match=rf"^--set mine\.range_min=60, {path}: mine\.range_min"):
        load_config(path, ["mine.range_min=60"])
    with pytest.raises(ConfigError, match=rf"^{path}: mine\.num_negatives=9 cannot be filled"):
        load_config(write(tmp_path, "mine:\n  top_k: 8\n  num_negatives: 9\n"))


def test_the_edge_of_the_window_is_allowed():
    cfg = load_config(None, ["mine.top_k=10", "mine.num_negatives=10", "mine.spare_negatives=0"])
    assert cfg.mine.num_negatives == 10


@pytest.mark.parametrize(
    "sets, phrase",
    [
        (["mine.range_max=200"], "mine.range_max=200 is beyond mine.top_k=100"),
        (["mine.top_k=10", "mine.range_max=10", "mine.num_negatives=7"], "mine.spare_negatives=7"),
        (["fncheck.scorer=x", "fncheck.band=[0.96, 1.0]"], "fncheck.band starts at 0.96"),
        (["train.max_steps=5", "train.warmup_steps=10"], "train.warmup_steps=10"),
        (["data.eval_split=train"], "data.eval_split is the training split"),
        (["cluster.workers=in_process", "cluster.n_workers=4"], "cluster.n_workers=4 is ignored"),
    ],
)
def test_unwise_combinations_load_with_a_warning(sets, phrase, caplog):
    with caplog.at_level("WARNING", logger="curate.config"):
        load_config(None, sets)
    assert phrase in caplog.text


def test_shipped_configs_load_without_warnings(caplog):
    with caplog.at_level("WARNING", logger="curate.config"):
        load_config(CONFIGS / "demo.yaml")
        load_config(CONFIGS / "default.yaml")
        load_config(None)
    assert caplog.text == ""
