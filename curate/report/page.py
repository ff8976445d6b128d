"""``curate report OUTDIR``: one self-contained ``report.html`` (opens offline) from a run folder.

Sections: overview, filter funnel, score distributions, topic clusters, batches, training,
evaluation (with the per-round curve of a retrain loop). Everything is read from what a run wrote:
``manifest.json`` and ``shards/``, ``forbidden.parquet`` (dropped candidates and their
scores), ``report.json``, ``model/train_log.jsonl`` and ``loop.json``. A missing part gives a
short note in its section, never an error. Plots are matplotlib PNGs embedded as base64.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path

from curate import health
from curate.files import atomic_write_bytes
from curate.report import sections as s
from curate.report.data import RunData, load_run
from curate.report.quality import quality_section

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
CSS = (
    "body{font:15px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
    "color:#222}\n"
    "h1{margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}\n"
    ".sub,.note{color:#666}.note{font-style:italic}nav a{margin-right:1em}img{max-width:100%}\n"
    "table{border-collapse:collapse;margin:.8em 0}td,th{padding:.25em .8em;"
    "border-bottom:1px solid #e5e5e5;text-align:right}\n"
    "td:first-child,th:first-child{text-align:left}th{background:#f5f5f5}"
    ".grid{display:flex;flex-wrap:wrap;gap:2em}\n"
    ".warn{border-left:6px solid #ff7f0e;background:#fff4e5;padding:.5em 1em;margin:.8em 0}"
    ".warn p{margin:.2em 0}\n"
    ".warn.failure{border-color:#d62728;background:#fdecea}.warn ul{margin:.3em 0}"
)


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
