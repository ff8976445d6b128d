"""``curate report OUTDIR``: one self-contained ``report.html`` (opens offline) from a run folder.

Sections: overview, filter funnel, score distributions, topic clusters, batches, training,
evaluation (with the per-round curve of a retrain loop). Everything is read from what a run wrote:
``manifest.json`` and ``shards/``, ``forbidden.parquet`` (dropped candidates and their
scores), ``report.json``, ``model/train_log.jsonl`` and ``loop.json``. A missing part gives a
short note in its section, never an error. Plots are matplotlib PNGs embedded as base64.
"""

from __future__ import annotations

import html
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from curate import health
from curate import report_sections as s
from curate.errors import CurateError
from curate.report_quality import quality_section
from curate.shards import MANIFEST, atomic_write_bytes, read_manifest

log = logging.getLogger(__name__)

SECTIONS = {
    "overview": "Overview",
    "funnel": "Filter funnel",
    "quality": "Mining quality",
    "scores": "Score distributions",
    "topics": "Topic clusters",
    "batches": "Batches",
    "training": "Training",
    "evaluation": "Evaluation",
}
CSS = """body{font:15px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
.sub,.note{color:#666}.note{font-style:italic}nav a{margin-right:1em}img{max-width:100%}
table{border-collapse:collapse;margin:.8em 0}td,th{padding:.25em .8em;border-bottom:1px solid #e5e5e5;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f5f5f5}.grid{display:flex;flex-wrap:wrap;gap:2em}
.warn{border-left:6px solid #ff7f0e;background:#fff4e5;padding:.5em 1em;margin:.8em 0}.warn p{margin:.2em 0}
.warn.failure{border-color:#d62728;background:#fdecea}.warn ul{margin:.3em 0}"""


@dataclass
class RunData:
    out: Path  # the folder asked for
    run_dir: Path  # the run the sections describe (out, or a loop's latest round)
    manifest: dict | None = None
    report: dict | None = None
    shards: pl.DataFrame | None = None
    forbidden: pl.DataFrame | None = None
    train_log: list[dict] = field(default_factory=list)
    rounds: list[dict] = field(default_factory=list)
    loop_warnings: list[dict] = field(default_factory=list)  # loop.json's (a round made it worse)


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _run_dir(out: Path) -> Path:
    """``out`` itself, or for a loop folder its latest complete round."""
    if (out / MANIFEST).is_file() or (out / "report.json").is_file():
        return out
    rounds = sorted(
        out.glob("round-*/report.json"), key=lambda p: int(p.parent.name.split("-")[-1])
    )
    return rounds[-1].parent if rounds else out


def load_run(out: str | Path) -> RunData:
    out = Path(out)
    run_dir = _run_dir(out)
    data = RunData(
        out, run_dir, read_manifest(run_dir / "shards", True), _json(run_dir / "report.json")
    )
    loop = _json(out / "loop.json") or (
        _json(run_dir.parent / "loop.json") if run_dir != out else None
    )
    data.rounds = (loop or {}).get("rounds", [])
    data.loop_warnings = (loop or {}).get("warnings") or []
    if data.manifest is None and data.report is None and not data.rounds:
        raise CurateError(
            f"{out}: no curate run here (no {MANIFEST}, report.json or loop.json); "
            "run `curate run -c CONFIG` (or `curate batch`) with output_dir pointing here first"
        )
    if data.manifest is not None:
        cols = ["batch_id", "query_id", "pos_id", "pos_score", "neg_ids", "neg_scores", "topic"]
        files = [run_dir / "shards" / f["path"] for f in data.manifest["files"]]
        data.shards = (
            pl.concat([pl.read_parquet(f, columns=cols) for f in files]) if files else None
        )
        rec = data.manifest.get("forbidden") or {"path": "../forbidden.parquet"}
        path = run_dir / "shards" / rec["path"]
        if path.is_file():
            data.forbidden = pl.read_parquet(path)
    data.train_log = health.read_train_log(run_dir / "model" / "train_log.jsonl")
    return data


def run_warnings(d: RunData) -> list[dict]:
    """Failures first: the loop's stop, the evaluation guard, then the data checks (recomputed,
    so a run from before the checks shows them too), then any other stored warning."""
    m = d.manifest or {"config": {}, **((d.report or {}).get("manifest") or {})}
    ev = health.eval_warnings((d.report or {}).get("eval"), m, d.train_log)
    if ev and d.shards is not None:  # name the rows per query per batch too
        per_query = health.rows_per_query(d.shards["batch_id"], d.shards["query_id"])
        ev = health.eval_warnings((d.report or {}).get("eval"), m, d.train_log, per_query)
    found = health.merge(
        d.loop_warnings, ev, health.data_warnings(m),
        (d.report or {}).get("warnings"), m.get("warnings"),
    )  # fmt: skip
    return sorted(found, key=lambda w: w.get("level") != "failure")


def warnings_block(warnings: list[dict]) -> str:
    out = []
    for w in warnings:
        level = "failure" if w.get("level") == "failure" else "warning"
        causes = "".join(
            f"<li>likely cause: {html.escape(c)}</li>" for c in w.get("likely_causes") or []
        )
        out.append(
            f'<div class="warn {level}" id="warning-{html.escape(str(w.get("code")))}">'
            f"<p><b>{level.upper()}: {html.escape(str(w.get('message')))}</b></p>"
            + (f"<ul>{causes}</ul>" if causes else "") + "</div>"
        )  # fmt: skip
    return "".join(out)


# --- assembly ---------------------------------------------------------------------------


RENDER = {
    "overview": s.overview,
    "funnel": s.funnel_section,
    "quality": quality_section,
    "scores": s.scores_section,
    "topics": s.topics_section,
    "batches": s.batches_section,
    "training": s.training_section,
    "evaluation": s.evaluation_section,
}


def render(d: RunData) -> str:
    nav = "".join(f'<a href="#{k}">{html.escape(v)}</a>' for k, v in SECTIONS.items())
    body = "".join(
        f'<section id="{k}"><h2>{html.escape(SECTIONS[k])}</h2>{RENDER[k](d)}</section>'
        for k in SECTIONS
    )
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>curate report: {html.escape(str(d.out))}</title><style>{CSS}</style></head>"
        f"<body><h1>curate report</h1>{warnings_block(run_warnings(d))}<nav>{nav}</nav>{body}"
        "</body></html>\n"
    )


def write_report(out: str | Path, path: str | Path | None = None) -> Path:
    """Render the report of run folder ``out`` to ``path`` (default ``out/report.html``)."""
    data = load_run(out)
    path = Path(path) if path else Path(out) / "report.html"
    atomic_write_bytes(path, render(data).encode("utf-8"))
    log.debug("report written to %s", path)
    return path
