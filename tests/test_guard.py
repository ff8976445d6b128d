"""The guard: a trained model that scores below the base model on the held-out split is a failure
in the CLI's last lines (exit 3), report.json and the top of report.html, and ``curate loop``
stops and keeps the better model. Planted with all-MiniLM-L6-v2 (a good base model) trained at
lr 1e-2 for 3 steps on a Cranfield slice, which wrecks it (nDCG@10 ~0.5 -> <0.1)."""

from __future__ import annotations

import html
import json
from pathlib import Path

import pytest
import yaml

from pipelines import cli


def _slice(
    root: Path, source: Path, n_train: int = 16, n_test: int = 20, n_docs: int = 200
) -> Path:
    """The first train and test queries, the first ``n_docs`` docs plus every positive of them."""
    qrels = {}
    for split, n in (("train", n_train), ("test", n_test)):
        rows = [
            line.split("\t")
            for line in (source / "qrels" / f"{split}.tsv").read_text().splitlines()[1:]
        ]
        keep = set(list(dict.fromkeys(r[0] for r in rows))[:n])
        qrels[split] = [r for r in rows if r[0] in keep]
    docs = [json.loads(line) for line in (source / "corpus.jsonl").read_text().splitlines()]
    wanted = {d["_id"] for d in docs[:n_docs] if d["text"].strip()}
    wanted |= {r[1] for rows in qrels.values() for r in rows}
    queries = {r[0] for rows in qrels.values() for r in rows}
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text(
        "".join(json.dumps(d) + "\n" for d in docs if d["_id"] in wanted)
    )
    (root / "queries.jsonl").write_text("".join(
        line + "\n" for line in (source / "queries.jsonl").read_text().splitlines()
        if json.loads(line)["_id"] in queries
    ))  # fmt: skip
    for split, rows in qrels.items():
        text = "query-id\tcorpus-id\tscore\n" + "".join("\t".join(r) + "\n" for r in rows)
        (root / "qrels" / f"{split}.tsv").write_text(text)
    return root


@pytest.fixture(scope="module")
def wrecking(tmp_path_factory, cranfield):
    """-> a config writer: the planted run that makes the model worse, sharing one cache."""
    root = tmp_path_factory.mktemp("guard")
    data = _slice(root / "data", cranfield)

    def config(name: str) -> Path:
        cfg = {
            "output_dir": str(root / name),
            "cache_dir": str(
                root / "cache"
            ),  # both tests embed the same texts with the same models
            "seed": 0,
            "data": {"path": str(data), "empty_text": "skip"},
            "embed": {"max_length": 64, "partition_size": 1000},
            "mine": {"top_k": 20, "num_negatives": 3, "range_max": 20},
            "batch": {"batch_size": 8},
            "train": {"max_steps": 3, "lr": 1.0e-2, "warmup_steps": 0, "max_length": 32},
            "eval": {"max_queries": 20},
            "cluster": {"workers": "in_process"},
        }
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    return config


def _last_lines(err: str, start: str) -> list[str]:
    lines = err.strip().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(start))
    return lines[first:]


def test_a_run_that_makes_the_model_worse_fails_loudly(wrecking, capsys):
    cfg = wrecking("run")
    assert cli.main(["run", "-c", str(cfg), "-q"]) == cli.WORSE
    err = capsys.readouterr().err
    last = _last_lines(err, "FAILURE: training made the model worse: nDCG@10 ")
    assert all(line.startswith(("FAILURE: ", "WARNING: ", "  likely cause: ")) for line in last)
    out = Path(yaml.safe_load(cfg.read_text())["output_dir"])
    report = json.loads((out / "report.json").read_text())
    base, trained = (report["eval"][k]["ndcg@10"] for k in ("base", "trained"))
    assert trained < base - 0.1  # planted: reliably worse, not by noise
    assert report["verdict"] == "worse_than_base"
    (guard,) = [w for w in report["warnings"] if w["code"] == "worse_than_base"]
    message = f"training made the model worse: nDCG@10 {base:.3f} -> {trained:.3f}"
    assert guard["message"].startswith(message) and guard["level"] == "failure"
    causes = "\n".join(guard["likely_causes"])
    for text in ("short of mine.num_negatives", "masked share of each softmax",
                 "ceiling used: mine.max_relative = "
                 "0.95", "rows of one query in a batch"):  # fmt: skip
        assert text in causes
    assert last[0] == f"FAILURE: {guard['message']}"
    page = (out / "report.html").read_text()
    top = page[: page.index("<nav>")]
    assert 'class="warn failure"' in top and html.escape(message) in top


def test_loop_stops_and_keeps_the_better_model(wrecking, capsys):
    cfg = wrecking("loop")
    assert cli.main(["loop", "-c", str(cfg), "--rounds", "3", "-q"]) == cli.WORSE
    std = capsys.readouterr()
    root = Path(yaml.safe_load(cfg.read_text())["output_dir"])
    got = json.loads((root / "loop.json").read_text())
    assert [r["round"] for r in got["rounds"]] == [0, 1]  # stopped after the worse round
    assert not (root / "round-2").exists()
    base_model = got["rounds"][0]["model"]
    assert got["best_round"] == 0 and got["model"] == base_model
    assert f"model:    {base_model}  (round 0, the best)" in std.out
    (stop,) = got["warnings"]
    assert stop["code"] == "loop_round_worse" and "keeps round 0's model" in stop["message"]
    assert _last_lines(std.err, "FAILURE: round 1 made the model worse")
    page = (root / "report.html").read_text()
    assert html.escape(stop["message"]) in page[: page.index("<nav>")]
