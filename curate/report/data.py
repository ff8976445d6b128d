"""A run folder loaded for the report: manifest, report.json, shards, forbidden pairs, the
training log and a loop's rounds; a missing part stays None (its section says so)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from curate import health
from curate.batch.shards import MANIFEST, read_manifest
from curate.errors import CurateError


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
