"""The ``curate`` command line, driven in-process through ``pipelines.cli.main`` (and once as
``python -m curate``): help texts, validate, config errors, optional subcommands."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import cli

COMMANDS = ("run", "embed", "index", "mine", "batch", "train", "eval", "loop", "export",
            "report", "validate")  # fmt: skip


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def test_every_command_is_registered(capsys):
    assert set(_subparsers()) == set(COMMANDS)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_help_lists_every_option_with_its_default(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([name, "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # undo the help's line wrapping
    out = out[out.index("options:") :]
    options = [a for a in _subparsers()[name]._actions if a.option_strings and a.dest != "help"]
    # each option's entry (from its flag to the next option's flag) names its default
    starts = []
    for action in options:
        starts.append(out.index(action.option_strings[-1], starts[-1] + 1 if starts else 0))
    for action, start, end in zip(options, starts, [*starts[1:], len(out)]):
        assert "default" in out[start:end], f"curate {name} {action.option_strings[-1]}"


def test_validate_prints_what_it_found(cranfield, capsys):
    code = cli.main(["validate", "--data", str(cranfield), "--set", "data.empty_text=skip", "-q"])
    out = capsys.readouterr().out
    assert code == 0
    for line in ("config ok", "docs: 1398", "skipped_empty_docs: 2", "queries: 225",
                 "qrels.test:", "train_pairs:", "nothing was run"):  # fmt: skip
        assert line in out, line
    assert "max_relative 0.95" in out
    cli.main(["validate", "--data", str(cranfield), "--set", "data.empty_text=skip", "-q",
              "--set", "mine.calibrate_ceiling=0.01"])  # fmt: skip
    assert "max_relative calibrated on known positives (FN <= 1.0%)" in capsys.readouterr().out


def test_unknown_key_gets_did_you_mean_and_exit_2(capsys):
    assert cli.main(["validate", "--set", "mine.num_negative=3", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0  # one line, no traceback
    assert "unknown key 'num_negative'" in err and "did you mean 'num_negatives'" in err


@pytest.mark.parametrize(
    "setting, message",
    [("batch.batch_size=1", "out of range"), ("mine.top_k=many", "expected an integer"),
     ("batch.shared_positives=drop", "choose one of")],
)  # fmt: skip
def test_bad_values_are_named_before_any_work(setting, message, capsys, tmp_path):
    out = tmp_path / "never-written"
    assert cli.main(["mine", "--output", str(out), "--set", setting, "-q"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_python_dash_m_curate_exits_2_with_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "curate", "validate", "--set", "mine.num_negative=3"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "did you mean 'num_negatives'" in lines[0]
    assert "Traceback" not in proc.stderr


def test_report_of_an_empty_folder_is_a_one_line_error(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path), "-q"]) == 2
    err = capsys.readouterr().err
    assert "no curate run here" in err and "Traceback" not in err


def test_python_api_mirrors_the_cli(cranfield):
    import curate
    from curate import api

    for name in COMMANDS:  # one function per subcommand (eval -> evaluate, report -> write_report)
        fn = {"eval": "evaluate", "report": "write_report"}.get(name, name)
        assert callable(getattr(api, fn)), name
    assert curate.run is api.run and curate.write_report is api.write_report
    cfg = api.as_config({"data": {"path": str(cranfield)}}, ["data.empty_text=skip"])
    assert api.as_config(cfg, ["mine.num_negatives=5"]).mine.num_negatives == 5
    found = curate.validate(cfg)
    assert found["stats"]["docs"] == 1398 and found["stats"]["train_pairs"] > 0
    with pytest.raises(curate.ConfigError, match="did you mean 'num_negatives'"):
        api.as_config(cfg, ["mine.num_negative=5"])


def test_set_errors_are_blamed_on_the_set_not_the_file(capsys):
    assert cli.main(["validate", "configs/demo.yaml", "--set", "batch.batch_size=-4", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --set batch.batch_size=-4: -4 is out of range [2, 65536]"


def test_impossible_settings_exit_2_naming_both_keys(capsys, tmp_path):
    out = tmp_path / "never-written"
    argv = ["mine", "configs/demo.yaml", "--output", str(out), "-q",
            "--set", "mine.top_k=5", "--set", "mine.num_negatives=10"]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --set mine.num_negatives=10, --set mine.top_k=5: ")
    assert "lower mine.num_negatives" in err and "\n" not in err
    assert not out.exists()


@pytest.fixture
def remote_code_folder(remote_code_model) -> Path:
    """A model folder whose config maps the Auto classes to its own code (conftest); that code
    must never run."""
    folder, marker = remote_code_model
    yield folder
    assert not marker.exists()


def test_validate_catches_a_model_that_needs_remote_code(remote_code_folder, cranfield, capsys):
    argv = ["validate", "--data", str(cranfield), "--set", "data.empty_text=skip", "-q",
            "--set", f"embed.model={remote_code_folder}"]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "embed.trust_remote_code: true" in err and "auto_map" in err and "\n" not in err
    assert cli.main([*argv, "--set", "embed.trust_remote_code=true"]) == 0  # the user's choice


def test_run_refuses_remote_code_before_creating_a_folder(remote_code_folder, cranfield, tmp_path,
                                                          capsys):  # fmt: skip
    out = tmp_path / "out"
    argv = ["run", "--data", str(cranfield), "--set", "data.empty_text=skip", "-q",
            "--output", str(out), "--set", f"embed.model={remote_code_folder}"]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: embed.model:") and "trust_remote_code" in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert not out.exists()


def test_a_batch_larger_than_the_data_with_drop_last_is_refused(cranfield, tmp_path, capsys):
    out = tmp_path / "never-written"
    sets = ["--set", "data.empty_text=skip", "--set", "batch.batch_size=2000",
            "--set", "batch.drop_last=true"]  # fmt: skip
    for command in ("validate", "batch"):
        assert cli.main([command, "--data", str(cranfield), "--output", str(out), "-q", *sets]) == 2
        err = capsys.readouterr().err
        # 853: Cranfield's 1,077 train pairs less its lowest grade (data.train_positives default)
        assert "batch.batch_size=2000" in err and "batch.drop_last" in err and "853" in err
    assert not out.exists()
    argv = [
        "validate",
        "--data",
        str(cranfield),
        "-q",
        *sets[:4],
    ]  # without drop_last: one short batch
    assert cli.main(argv) == 0
