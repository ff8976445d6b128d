"""The retrain loop: two rounds on a Cranfield slice, a table and plot, resumable by round."""

from __future__ import annotations

import json

from curate.batch.shards import MANIFEST
from curate.config import config_from_dict
from pipelines.loop import format_table, loop


def test_two_rounds_then_resume(tmp_path, cranfield, tiny_model):
    cfg = config_from_dict(
        {
            "output_dir": str(tmp_path),
            "data": {"path": str(cranfield), "empty_text": "skip", "max_train_queries": 16},
            "embed": {"model": str(tiny_model), "max_length": 32, "partition_size": 700},
            "mine": {"top_k": 10, "num_negatives": 2, "range_max": 10, "max_relative": None,
                     "near_dup_threshold": 0.99999},
            "batch": {"batch_size": 8},
            "train": {"max_steps": 2, "max_length": 16, "lr": 1e-3},
            "eval": {"max_queries": 10},
            "cluster": {"workers": "in_process"},  # the loop, not the cluster, is under test
        }
    )  # fmt: skip
    # keep_going: the random tiny BERT's rounds differ by noise; the stop is test_guard's
    table = loop(cfg, rounds=2, keep_going=True)
    assert [r["round"] for r in table] == [0, 1, 2]
    # round 2 mines with round 1's model and starts training from it
    r2 = json.loads((tmp_path / "round-2" / MANIFEST).read_text())
    assert r2["config"]["embed"]["model"] == table[1]["model"]
    got = json.loads((tmp_path / "loop.json").read_text())
    assert got["rounds"] == table
    best = max(table, key=lambda r: r["ndcg@10"])  # the kept model is the best round's
    assert (got["best_round"], got["model"]) == (best["round"], best["model"])
    assert (tmp_path / "loop.png").read_bytes()[:4] == b"\x89PNG"
    assert "ndcg@10" in format_table(table)

    stamp = (tmp_path / "round-1" / "report.json").stat().st_mtime_ns
    again = loop(cfg, rounds=2, keep_going=True)  # both rounds complete: nothing runs again
    assert again == table
    assert (tmp_path / "round-1" / "report.json").stat().st_mtime_ns == stamp


def test_a_worse_round_stops_the_loop_and_the_better_round_is_kept(tmp_path, tiny_model, capsys):
    """Rounds 1 and 2 planted as complete (their report.json): round 2 scores below round 1, so
    round 3 never runs and round 1's model is the one loop.json and the CLI name."""
    from pipelines import cli

    scores = {0: 0.30, 1: 0.40, 2: 0.35}
    for r in (1, 2):
        metrics = {n: {"ndcg@10": scores[r - 1 + (n == "trained")], "recall@100": 0.5,
                       "mrr@10": 0.3} for n in ("base", "trained")}  # fmt: skip
        (tmp_path / f"round-{r}").mkdir()
        report = {"eval": metrics, "model": f"round-{r}/model/final", "warnings": []}
        (tmp_path / f"round-{r}" / "report.json").write_text(json.dumps(report))
    cfg = {"output_dir": str(tmp_path), "overwrite": True, "embed": {"model": str(tiny_model)},
           "data": {"path": str(tmp_path / "data")}}  # fmt: skip
    (tmp_path / "loop.yaml").write_text(json.dumps(cfg))
    assert cli.main(["loop", "-c", str(tmp_path / "loop.yaml"), "--rounds", "3", "-q"]) == 0
    std = capsys.readouterr()
    got = json.loads((tmp_path / "loop.json").read_text())
    assert [r["round"] for r in got["rounds"]] == [0, 1, 2] and not (tmp_path / "round-3").exists()
    assert (got["best_round"], got["model"]) == (1, "round-1/model/final")
    assert "model:    round-1/model/final  (round 1, the best)" in std.out
    (stop,) = got["warnings"]
    assert stop["level"] == "warning" and "keeps round 1's model" in stop["message"]
    assert std.err.strip().splitlines()[-1] == f"WARNING: {stop['message']}"
    page = (tmp_path / "report.html").read_text()
    assert "round 2 made the model worse: nDCG@10 0.400 (round 1) -&gt; 0.350" in page
