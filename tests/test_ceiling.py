"""Choosing mine.max_relative by hiding known positives in turn (curate/ceiling.py): a case
counted by hand, the random-strategy expectation, single-positive data, and a pipeline run
that mines with the chosen ceiling and records it in the manifest."""

from __future__ import annotations

import numpy as np
import pytest
from slice_data import pipeline_config

from curate.batch.shards import read_manifest
from curate.config import MineConfig, config_from_dict
from curate.mine import ceiling
from curate.mine.ceiling import GRID, calibrate
from pipelines.run import run

# The query is e0, so a doc's score is its first coordinate. Query 0 knows docs 0 (0.9) and
# 1 (0.85); docs 2-4 score 0.6, 0.5, 0.4. Query 1 knows doc 2 only and takes no part.
DOCS = np.array([[0.9, 0], [0.85, 0], [0.6, 0], [0.5, 0], [0.4, 0]], np.float32)
QUERIES = np.array([[1, 0], [1, 0]], np.float32)
KNOWN = [np.array([0, 1]), np.array([2])]


def test_hand_counted_case():
    """Hiding doc 1 (ref 0.9 from doc 0): it ranks first among the candidates and passes the
    ceiling iff 0.85 <= 0.9c, i.e. c >= 0.95, so it is mined at 1.00 and 0.95. Hiding doc 0
    (ref 0.85): 0.9 is above every ceiling <= 1. Two negatives per hiding while 0.9c and
    0.85c both reach 0.5 (c >= 0.6), one below. -> rate 1/4 at 1.00 and 0.95, 0 from 0.90."""
    cfg = MineConfig(top_k=5, num_negatives=2, range_max=5)
    cal = calibrate(DOCS, QUERIES, KNOWN, cfg, target=0.01, seed=0)
    assert (cal.max_relative, cal.queries, cal.held_out) == (0.9, 1, 2)
    assert cal.fn_rate["1.00"] == cal.fn_rate["0.95"] == 0.25
    assert all(cal.fn_rate[f"{c:.2f}"] == 0 for c in GRID[2:])
    assert cal.negatives["0.60"] == 4 and cal.negatives["0.55"] == 2
    # A looser target accepts the leak; the ceiling reference follows mine.ceiling_from.
    assert calibrate(DOCS, QUERIES, KNOWN, cfg, target=0.3, seed=0).max_relative == 1.0
    weakest = MineConfig(top_k=5, num_negatives=2, range_max=5, ceiling_from="weakest")
    assert calibrate(DOCS, QUERIES, KNOWN, weakest, target=0.01, seed=0).max_relative == 0.9


def test_trained_reference_follows_ceiling_over_trained():
    """``mine.ceiling_over: trained``: the reference comes from the training rows' positives,
    as the miner takes it. Only doc 0 trained: hiding doc 1 is measured against 0.9 as before
    (1 of 2 negatives at 1.00), hiding doc 0 leaves no reference and takes no part. Only doc 1
    trained: hiding doc 0 is measured against 0.85 and scores above every ceiling -> 1.00."""
    cfg = MineConfig(top_k=5, num_negatives=2, range_max=5, ceiling_over="trained")
    via0 = calibrate(DOCS, QUERIES, KNOWN, cfg, 0.01, 0, trained=[np.array([0]), np.array([2])])
    assert via0.held_out == 1 and via0.fn_rate["1.00"] == 0.5 and via0.max_relative == 0.9
    via1 = calibrate(DOCS, QUERIES, KNOWN, cfg, 0.01, 0, trained=[np.array([1]), np.array([2])])
    assert via1.held_out == 1 and via1.max_relative == 1.0
    # No hiding with a reference left: the configured ceiling stays.
    none = calibrate(DOCS, QUERIES, KNOWN, cfg, 0.01, seed=0,
                     trained=[np.array([], np.int64), np.array([2])])  # fmt: skip
    assert (none.max_relative, none.held_out) == (cfg.max_relative, 0)


def test_random_strategy_counts_the_chance_of_being_drawn():
    """At 1.00 the hidden doc 1 is one of 4 eligible candidates, 2 drawn: expected 0.5 FN."""
    cfg = MineConfig(top_k=5, num_negatives=2, range_max=5, strategy="random")
    cal = calibrate(DOCS, QUERIES, KNOWN, cfg, target=0.01, seed=0)
    assert cal.fn_rate["1.00"] == pytest.approx(0.5 / 4)
    assert cal.max_relative == 0.9


def test_window_and_depth_hide_what_the_miner_would_not_see():
    """A hidden positive beyond the search depth or before range_min cannot be mined."""
    shallow = MineConfig(top_k=1, num_negatives=2, range_max=1)  # rank 0 only: doc 0 or doc 1
    assert calibrate(DOCS, QUERIES, KNOWN, shallow, target=0.0, seed=0).fn_rate["1.00"] == 0
    # Ranks count the visible positive too, as the miner's do: hidden doc 1 sits at rank 1.
    inside = MineConfig(top_k=5, num_negatives=2, range_min=1, range_max=5)
    assert calibrate(DOCS, QUERIES, KNOWN, inside, target=0.01, seed=0).fn_rate["1.00"] > 0
    beyond = MineConfig(top_k=5, num_negatives=2, range_min=2, range_max=5)
    assert calibrate(DOCS, QUERIES, KNOWN, beyond, target=0.01, seed=0).fn_rate["1.00"] == 0


def test_single_positive_data_keeps_the_configured_ceiling():
    cal = calibrate(DOCS, QUERIES, [np.array([0]), np.array([2])], MineConfig(), 0.01, seed=0)
    assert (cal.max_relative, cal.queries, cal.fn_rate) == (MineConfig().max_relative, 0, {})


@pytest.mark.parametrize("over", ["known", "trained"])
def test_pipeline_mines_with_the_calibrated_ceiling(tmp_path, cranfield, tiny_model, monkeypatch,
                                                    over):
    cfg = pipeline_config(
        tmp_path / "out", cranfield, tiny_model, cluster={"workers": "in_process"}
    )
    cfg["mine"] = {**cfg["mine"], "max_relative": None, "calibrate_ceiling": 0.0,
                   "ceiling_over": over}
    cfg["train"] = {"enabled": False}
    cfg["eval"] = {"enabled": False}
    result = run(config_from_dict(cfg), quiet=True)
    cal = read_manifest(tmp_path / "out" / "shards")["ceiling_calibration"]
    assert cal["queries"] > 0 and cal["max_relative"] in GRID
    chosen = cal["max_relative"]
    assert cal["fn_rate"][f"{chosen:.2f}"] == 0 or chosen == GRID[-1]
    funnel = result["manifest"]["funnel"]
    assert funnel.get("above_ceiling", 0) > 0  # max_relative None in the config, yet a ceiling ran

    # A rerun in place reads the calibration back instead of searching again, and agrees.
    def no_search(*args, **kwargs):
        raise AssertionError("calibrated again on a rerun")

    monkeypatch.setattr(ceiling, "calibrate", no_search)
    run(config_from_dict(cfg), quiet=True)
    assert read_manifest(tmp_path / "out" / "shards")["ceiling_calibration"] == cal
