"""The settings a run decided for itself (a calibrated ceiling, an nprobe the recall guard
raised) are written in one place beside the config: manifest["effective"] and report.json,
and ``curate validate`` says which settings will be decided at run time."""

from __future__ import annotations

import json

import pytest
from slice_data import pipeline_config, write_slice

from curate.batch.shards import read_manifest
from curate.config import config_from_dict
from curate.effective import effective_settings
from pipelines import cli
from pipelines.run import run


@pytest.fixture(scope="module")
def decided(tmp_path_factory, cranfield, tiny_model):
    """One slice run that calibrates its ceiling and, on an IVF index probed at 1 of 16 lists,
    has the recall guard raise nprobe."""
    root = tmp_path_factory.mktemp("effective")
    data = write_slice(root / "data", cranfield)
    cfg = pipeline_config(
        root / "out", data, tiny_model, cluster={"workers": "in_process"},
        mine={"max_relative": None, "calibrate_ceiling": 0.0},
    )  # fmt: skip
    cfg["index"] = {"factory": "IVF16,Flat", "nprobe": 1, "recall_action": "raise_nprobe"}
    result = run(config_from_dict(cfg), quiet=True)
    return result, read_manifest(root / "out" / "shards"), root / "out"


def test_manifest_shows_the_settings_used(decided):
    result, manifest, out = decided
    used = {e["key"]: e for e in manifest["effective"]}
    assert set(used) == {"mine.max_relative", "index.nprobe"}
    ceiling = used["mine.max_relative"]
    assert ceiling["configured"] is None
    assert ceiling["used"] == manifest["ceiling_calibration"]["max_relative"] is not None
    assert "calibrate_ceiling" in ceiling["why"]
    nprobe = used["index.nprobe"]
    assert nprobe["configured"] == 1 and nprobe["used"] == manifest["index_recall"]["nprobe"] > 1
    assert "recall" in nprobe["why"]
    # config keeps what was asked for; report.json carries the same list
    assert manifest["config"]["mine"]["max_relative"] is None
    assert manifest["config"]["index"]["nprobe"] == 1
    report = json.loads((out / "report.json").read_text())
    assert report["effective"] == manifest["effective"] == result["effective"]


def test_nothing_decided_at_run_time_is_an_empty_list():
    cfg = config_from_dict({})
    assert effective_settings(cfg, cfg.mine, cfg.index.nprobe, None, {"exact": True}) == []


def test_validate_names_what_the_run_will_decide(cranfield, capsys):
    base = ["validate", "--data", str(cranfield), "--set", "data.empty_text=skip", "-q"]
    assert cli.main(base) == 0
    assert "decided at run time" not in capsys.readouterr().out
    cli.main([*base, "--set", "mine.calibrate_ceiling=0.01", "--set", "index.factory=IVF64,Flat",
              "--set", "index.recall_action=raise_nprobe"])  # fmt: skip
    out = capsys.readouterr().out
    assert "mine.max_relative: calibrated at run time (target 0.01)" in out
    assert "index.nprobe: raised at run time while recall@100 < 0.95" in out
    assert "configured 32" in out
