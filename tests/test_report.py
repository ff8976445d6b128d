"""``curate report`` on a small real run driven through the CLI (``curate mine`` then
``curate run``, which reuses what mine wrote): every section, every embedded PNG, offline."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import pytest
import yaml
from PIL import Image

from curate.batch.shards import MANIFEST
from curate.errors import CurateError
from curate.report.data import load_run
from curate.report.page import SECTIONS, render, write_report
from curate.report.sections import funnel_rows
from pipelines import cli

PNG = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def _config(out: Path, data: Path, model: Path) -> dict:
    return {
        "output_dir": str(out),
        "seed": 3,
        "data": {"path": str(data), "empty_text": "skip", "max_train_queries": 24},
        "embed": {"model": str(model), "max_length": 32, "partition_size": 700},
        # a random tiny BERT scores everything alike: loosen the score filters (see test_pipeline)
        "mine": {"top_k": 20, "num_negatives": 3, "range_max": 20, "max_relative": None,
                 "near_dup_threshold": 0.99999},
        "batch": {"batch_size": 8, "batches_per_shard": 2},
        "train": {"max_steps": 3, "max_length": 16, "checkpoint_every": 2},
        "eval": {"max_queries": 10},
        "cluster": {"workers": "in_process"},  # the cluster stages have their own tests
    }  # fmt: skip


def _images(page: str) -> list[Image.Image]:
    images = []
    for b64 in PNG.findall(page):
        img = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
        img.load()  # decodes every pixel; raises on a truncated or corrupt PNG
        images.append(img)
    return images


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cranfield, tiny_model):
    root = tmp_path_factory.mktemp("report-run")
    cfg = root / "small.yaml"
    cfg.write_text(yaml.safe_dump(_config(root / "out", cranfield, tiny_model)))
    assert cli.main(["mine", "-c", str(cfg), "-q"]) == 0
    out = root / "out"
    assert not (out / "shards").exists() and not (out / "report.json").exists()
    mined = {p: p.stat().st_mtime_ns for p in (out / "work").rglob("*") if p.is_file()}
    rc = cli.main(["run", "-c", str(cfg), "-q"])
    # a random tiny BERT may train worse or better by noise: the exit status follows the verdict
    verdict = json.loads((out / "report.json").read_text())["verdict"]
    assert rc == (cli.WORSE if verdict == "worse_than_base" else 0)
    # the stages mine ran were cached: run rewrote none of their files
    assert {p: p.stat().st_mtime_ns for p in mined} == mined
    return out


def test_run_writes_a_report_with_every_section(run_dir):
    page = (run_dir / "report.html").read_text()
    for title in SECTIONS.values():
        assert f"<h2>{title}</h2>" in page
    images = _images(page)
    assert len(images) == 5  # funnel, scores, topics, batches, training; no loop: no curve
    assert all(img.format == "PNG" and img.width > 200 and img.height > 100 for img in images)
    funnel = json.loads((run_dir / MANIFEST).read_text())["funnel"]
    assert f"<td>candidates</td><td>{funnel['candidates']:,}</td>" in page
    assert f"<td>kept</td><td>{funnel['kept']:,}</td>" in page
    assert "dropped: known_positive" in page  # dropped-candidate scores from forbidden.parquet
    assert "<td>ndcg@10</td>" in page and "no retrain loop here" in page
    quality = json.loads((run_dir / MANIFEST).read_text())["mining_quality"]
    assert (
        f"<td>pairs left without negatives</td><td>{quality['pairs_without_negatives']}</td>"
        in page
    )
    assert "exact (flat) search" in page and "targeted false-negative check: off" in page


def test_report_is_self_contained(run_dir):
    page = (run_dir / "report.html").read_text()
    assert "<script" not in page and "<link" not in page
    assert not re.search(r"(src|href)=\"(?!data:|#)", page)  # nothing to fetch


def test_loop_json_adds_the_per_round_curve(run_dir, tmp_path):
    rounds = [{"round": r, "model": "m", "ndcg@10": 0.1 * r, "recall@100": 0.5, "mrr@10": 0.2}
              for r in range(3)]  # fmt: skip
    (run_dir / "loop.json").write_text(json.dumps({"rounds": rounds}))
    try:
        assert cli.main(["report", str(run_dir), "-o", str(tmp_path / "r.html"), "-q"]) == 0
    finally:
        (run_dir / "loop.json").unlink()
    page = (tmp_path / "r.html").read_text()
    assert "<h3>Retrain loop</h3>" in page and len(_images(page)) == 6


def test_missing_parts_become_notes(run_dir):
    data = load_run(run_dir)
    data.forbidden = data.forbidden.drop("score")  # a run from before forbidden had scores
    data.train_log, data.report = [], None
    page = render(data)
    assert "has no score column" in page
    assert "no training log" in page and "no evaluation in report.json" in page
    assert len(_images(page)) == 4


def test_funnel_rows_keep_pipeline_order():
    rows = funnel_rows({"kept": 2, "candidates": 10, "not_selected": 3, "above_ceiling": 4,
                        "known_positive": 1, "some_new_rule": 0})  # fmt: skip
    names = [n for n, _ in rows]
    assert names[0] == "candidates" and names[-1] == "kept"
    assert (
        names.index("known_positive") < names.index("above_ceiling") < names.index("not_selected")
    )
    assert "some_new_rule" in names and dict(rows)["out_of_window"] == 0


def test_report_of_nothing_raises(tmp_path):
    with pytest.raises(CurateError, match="no curate run here"):
        write_report(tmp_path)


def test_final_loss_is_smoothed_and_a_short_last_batch_is_marked(run_dir):
    data = load_run(run_dir)
    data.train_log = [{"step": i + 1, "loss": 3.0 + (i % 2), "rows": 8} for i in range(12)]
    data.train_log.append({"step": 13, "loss": 0.2, "rows": 2})
    page = render(data)
    assert "<td>final loss (mean of the last 10 full batches)</td><td>3.5000</td>" in page
    assert "<td>last step&#x27;s loss (short batch: 2 of 8 rows)</td><td>0.2000</td>" in page
    data.train_log.pop()
    assert "short batch" not in render(data)


def test_warnings_and_effective_settings_head_the_report(run_dir):
    data = load_run(run_dir)
    data.manifest["counts"].update(rows=40, rows_without_negatives=3)
    data.manifest["effective"] = [
        {"key": "mine.max_relative", "configured": 0.95, "used": 0.8, "why": "calibrated"}
    ]
    ev = data.report["eval"]
    ev = {"base": {**ev["base"], "ndcg@10": 0.32}, "trained": {**ev["trained"], "ndcg@10": 0.161}}
    data.report = {**data.report, "eval": ev}
    page = render(data)
    top = page[: page.index("<nav>")]
    fail = top.index("FAILURE: training made the model worse: nDCG@10 0.320 -&gt; 0.161")
    assert fail < top.index("WARNING: 3 of 40 rows (7.5%) have no hard negative")  # failures first
    assert "likely cause: ceiling used: mine.max_relative = 0.8" in top
    assert "<td>mine.max_relative</td><td>0.9500</td><td>0.8000</td><td>calibrated</td>" in page
