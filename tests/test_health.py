"""Loud warnings (curate/health.py): the pure checks on small records, then a degenerate run (a
tiny random BERT, whose embeddings collapse, with the default score filters) whose warning must
reach the CLI's last lines, the manifest, report.json and the top of report.html."""

from __future__ import annotations

import html
import json

import numpy as np
import pytest
import yaml
from slice_data import pipeline_config, write_slice

from curate import health
from curate.batch import shards
from pipelines import cli


def test_embedding_health_tells_collapsed_from_healthy_vectors():
    rng = np.random.default_rng(0)
    healthy = rng.normal(size=(500, 32)).astype(np.float32)
    collapsed = rng.normal(size=32) + 0.05 * healthy  # every vector in almost one direction
    good, bad = health.embedding_health(healthy, seed=1), health.embedding_health(collapsed, seed=1)
    assert abs(good["mean_cosine"]) < 0.1 and not good["collapsed"]
    assert bad["mean_cosine"] > 0.99 and bad["collapsed"] and bad["pairs"] == health.COSINE_PAIRS
    assert health.embedding_health(collapsed, seed=1) == bad  # seeded
    assert health.embedding_health(healthy[:1], seed=1)["mean_cosine"] is None


def _manifest(**counts) -> dict:
    return {
        "config": {"mine": {"num_negatives": 4, "max_relative": 0.95, "near_dup_threshold": 0.98}},
        "counts": {"train_pairs": 100, "rows": 100, **counts},
        "funnel": {"candidates": 2000, "near_duplicate": 1400, "above_ceiling": 500,
                   "not_selected": 80, "kept": 20},
        "embedding_health": {"mean_cosine": 0.97, "pairs": 1000, "collapsed": True},
    }  # fmt: skip


def test_few_negatives_name_the_dominant_drop_and_its_cause():
    found = {w["code"]: w for w in health.data_warnings(_manifest(rows_without_negatives=90))}
    assert set(found) == {"few_negatives_kept", "rows_without_negatives", "collapsed_embeddings"}
    kept = found["few_negatives_kept"]
    assert "20 of 2,000 candidates kept" in kept["message"] and "5.0% of the 400" in kept["message"]
    (cause,) = kept["likely_causes"]
    assert "near_duplicate (1,400 of 2,000 candidates, 70%)" in cause and "collapsed" in cause
    assert "only 10.0% have one" in found["rows_without_negatives"]["message"]


def test_a_healthy_run_has_no_loud_warning_but_empty_rows_stay_visible():
    m = _manifest(rows_without_negatives=3)
    m["funnel"] = {"candidates": 2000, "kept": 390, "not_selected": 1500, "near_duplicate": 110}
    m["embedding_health"] = {"mean_cosine": 0.2, "pairs": 1000, "collapsed": False}
    (w,) = health.data_warnings(m)
    assert w["code"] == "rows_without_negatives" and w["level"] == "warning"
    assert w["message"].startswith("3 of 100 rows (3.0%) have no hard negative")
    m["counts"]["rows_without_negatives"] = 0
    assert health.data_warnings(m) == []
    cause = health._drop_causes(m)[0]  # not collapsed: the threshold is named instead
    assert "near_duplicate" in cause and "mine.near_dup_threshold (0.98)" in cause


def test_effective_setting_wins_over_the_configured_one():
    m = _manifest()
    assert health.effective(m, "mine.max_relative") == 0.95
    m["ceiling_calibration"] = {"max_relative": 0.8}
    assert health.effective(m, "mine.max_relative") == 0.8
    m["effective"] = [{"key": "mine.max_relative", "configured": 0.95, "used": 0.75, "why": "x"}]
    assert health.effective(m, "mine.max_relative") == 0.75


def test_final_loss_is_smoothed_and_a_short_last_batch_is_marked():
    log = [
        {"step": i + 1, "loss": 2.0 + (i % 2), "rows": 8, "masked_fraction": 0.1} for i in range(20)
    ] + [{"step": 21, "loss": 0.3, "rows": 2, "masked_fraction": 0.1}]
    got = health.loss_summary(log)
    assert got["smoothed_loss"] == 2.5 and got["smoothed_steps"] == health.SMOOTH_STEPS
    assert got["short_last_batch"] and got["last_rows"] == 2 and got["full_rows"] == 8
    assert got["last_loss"] == 0.3
    assert not health.loss_summary(log[:-1])["short_last_batch"]


def test_worse_than_base_is_a_failure_naming_its_causes():
    m = _manifest(rows_without_negatives=10, rows_short_of_negatives=25, masked_pairs=12,
                  full_batches=4)  # fmt: skip
    m["config"]["train"] = {"lr": 0.01, "temperature": 0.05}
    ev = {"base": {"ndcg@10": 0.32}, "trained": {"ndcg@10": 0.161}}
    log = [{"step": 1, "loss": 1.0, "rows": 8, "masked_fraction": 0.25}]
    (w,) = health.eval_warnings(ev, m, log)
    assert w["code"] == "worse_than_base" and w["level"] == "failure"
    assert (
        w["message"]
        == "training made the model worse: nDCG@10 0.320 -> 0.161 on the held-out split"
    )
    causes = "\n".join(w["likely_causes"])
    for text in ("25 of 100 rows (25.0%) short of mine.num_negatives",
                 "masked share of each softmax: 25.0%", "3.0 per batch",
                 "mine.max_relative = 0.95", "train.lr 0.01"):  # fmt: skip
        assert text in causes
    assert health.verdict([w]) == "worse_than_base"
    assert (
        health.eval_warnings({"base": {"ndcg@10": 0.3}, "trained": {"ndcg@10": 0.3}}, m, log) == []
    )
    assert health.eval_warnings(None, m, log) == [] and health.verdict([]) == "ok"


@pytest.fixture(scope="module")
def degenerate_run(tmp_path_factory, cranfield, tiny_model):
    """A Cranfield slice embedded by the tiny random BERT (random pairs at cosine ~0.97) under
    the default score filters: the near-duplicate rule rejects (almost) every candidate."""
    root = tmp_path_factory.mktemp("degenerate")
    data = write_slice(root / "data", cranfield)
    cfg = pipeline_config(root / "out", data, tiny_model, cluster={"workers": "in_process"},
                          mine={"max_relative": 0.95, "near_dup_threshold": 0.98})  # fmt: skip
    (root / "run.yaml").write_text(yaml.safe_dump(cfg))
    return root / "run.yaml", root / "out"


def test_a_run_that_keeps_no_negatives_warns_everywhere(degenerate_run, capsys):
    cfg, out = degenerate_run
    assert cli.main(["run", "-c", str(cfg), "-q"]) == 0  # the data is suspect, not harmful yet
    std = capsys.readouterr()
    lines = std.err.strip().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("WARNING: the run kept"))
    last = lines[first:]  # the warnings are the last lines, nothing after them
    assert all(line.startswith(("WARNING: ", "  likely cause: ")) for line in last)
    assert len([line for line in last if line.startswith("WARNING: ")]) == 3
    assert "dominant drop reason: near_duplicate" in std.err and "look collapsed" in std.err
    manifest = shards.read_manifest(out / "shards")
    assert manifest["embedding_health"]["collapsed"]
    assert manifest["embedding_health"]["mean_cosine"] > health.COLLAPSE_COSINE
    codes = {"few_negatives_kept", "rows_without_negatives", "collapsed_embeddings"}
    assert {w["code"] for w in manifest["warnings"]} == codes
    report = json.loads((out / "report.json").read_text())
    assert {w["code"] for w in report["warnings"]} == codes and report["verdict"] == "warnings"
    page = (out / "report.html").read_text()
    top = page[: page.index("<nav>")]  # above every section
    for w in manifest["warnings"]:
        assert html.escape(w["message"]) in top
    assert 'class="warn warning"' in top
