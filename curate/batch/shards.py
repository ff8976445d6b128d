"""Shard writer and reader: whole batches per row group, atomic files, manifest last.

A shard is a Parquet file holding ``batches_per_shard`` batches; each batch is exactly one row
group, so a trainer (or a resume) can address batch b as (file, row group). Every file is
written to ``<name>.tmp`` and renamed; the manifest is written last and so marks a complete
write. Same rows + same seed -> byte-identical files.

The manifest lives beside the shard folder (``<run>/manifest.json`` for ``<run>/shards``), not
in it: pyarrow, pandas, polars and ``datasets`` all read a folder as one table only when it holds
nothing but Parquet (polars and ``datasets`` do not skip ``_``-prefixed names). Paths inside it
(``files``, ``forbidden``) are relative to the shard folder.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate import faults, schema
from curate.errors import CurateError
from curate.files import PARQUET_OPTS, atomic_path, sha256, write_json

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"  # in the run folder, beside shards/: see manifest_path


def _ledger(shard_dir: Path) -> Path:
    """Beside the shard folder (which holds nothing but Parquet): the shard files curate is
    writing or wrote there, recorded before it writes them."""
    return shard_dir.parent / f".{shard_dir.name}-written.json"


def written_here(shard_dir: Path) -> list[str]:
    """The shard files curate wrote in ``shard_dir``: its record, and those a curate manifest
    lists (older runs kept no record). Only these are ever deleted: never another program's."""
    ledger, names = _ledger(shard_dir), set()
    for path in (ledger, shard_dir / MANIFEST, shard_dir.parent / MANIFEST):
        try:
            record = json.loads(path.read_text()) if path.is_file() else {}
        except ValueError:
            continue
        if path == ledger or str(record.get("format", "")).startswith("curate-shards"):
            names |= {r["path"] if isinstance(r, dict) else r for r in record.get("files", [])}
    ours = sorted(n for n in names if isinstance(n, str) and Path(n).name == n
                  and n.startswith("shard-") and n.endswith(".parquet"))  # fmt: skip
    if others := sorted(set(p.name for p in shard_dir.glob("shard-*.parquet")) - set(ours)):
        log.warning("%s: %s not written by curate, left in place (the folder then holds more "
                    "than this run's shards)", shard_dir, ", ".join(others[:5]))  # fmt: skip
    return ours


@dataclass(frozen=True)
class ShardJob:
    """One shard file: rows ``start`` to ``start + bounds[-1]`` of the table, one row group per
    batch between consecutive ``bounds`` (relative to ``start``)."""

    name: str
    start: int
    bounds: tuple[int, ...]


def write_shard(part: pa.Table, bounds: tuple[int, ...], path: Path) -> None:
    """One shard's SHARD table -> ``path`` (temp name, then rename), a row group per batch."""
    schema.check(part, schema.SHARD, "shards")
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, part.schema, **PARQUET_OPTS) as w:
        for a, b in zip(bounds, bounds[1:]):
            w.write_table(part.slice(a, b - a))


def write_shards(table: pa.Table | None, out_dir: Path, batches_per_shard: int,
                 fill: Callable[[pa.Table], pa.Table] | None = None,
                 write_many: Callable[[list[ShardJob]], list[Path]] | None = None,
                 jobs: list[ShardJob] | None = None) -> list[dict]:
    """``table`` (SHARD schema) sorted by batch_id -> shard files; returns their file records.
    ``fill``: a shard's rows -> its SHARD table (e.g. the texts looked up), called once per shard
    so that only one shard's worth of text is ever built. ``write_many``: writes every job's
    shard elsewhere (worker tasks, outside ``out_dir``) and returns the files in job order,
    renamed into place here one by one; with ``jobs`` (``shard_jobs`` of the table, computed
    where the table is) it needs no table."""
    if fill is None and write_many is None:
        schema.check(table, schema.SHARD, "shards")
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = written_here(out_dir)  # read before the manifest that lists them goes
    # The manifest goes first: a crash below must not leave an old manifest over new shards.
    manifest_path(out_dir).unlink(missing_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # where an older curate wrote it
    for name in stale:  # a rerun with other settings may write fewer shards
        (out_dir / name).unlink(missing_ok=True)
    if jobs is None:
        jobs = shard_jobs(table.column("batch_id").to_numpy(), batches_per_shard)
    write_json(_ledger(out_dir), {"files": [j.name for j in jobs]})  # a crash forgets none
    staged = write_many(jobs) if write_many is not None else [None] * len(jobs)
    records = []
    for job, src in zip(jobs, staged, strict=True):
        path = out_dir / job.name
        if src is None:
            part = table.slice(job.start, job.bounds[-1])
            write_shard(fill(part) if fill is not None else part, job.bounds, path)
        else:
            os.replace(src, path)
        faults.reached("shard")  # test-only crash point
        records.append({"path": path.name, "batches": len(job.bounds) - 1,
                        "rows": job.bounds[-1], "sha256": sha256(path)})  # fmt: skip
    return records


def shard_jobs(batch_ids: np.ndarray, batches_per_shard: int) -> list[ShardJob]:
    """Rows sorted by batch id -> the shard files, ``batches_per_shard`` batches each."""
    bounds = [0, *(np.flatnonzero(np.diff(batch_ids)) + 1).tolist(), len(batch_ids)]
    jobs = []
    for s, first in enumerate(range(0, len(bounds) - 1, batches_per_shard)):
        last = min(first + batches_per_shard, len(bounds) - 1)
        rel = tuple(b - bounds[first] for b in bounds[first : last + 1])
        jobs.append(ShardJob(f"shard-{s:05d}.parquet", bounds[first], rel))
    return jobs


class MissingManifestError(CurateError, FileNotFoundError):
    """No manifest for a shard folder: the shards are incomplete, absent or of an older layout."""


def manifest_path(shard_dir: Path) -> Path:
    """Where the manifest of ``shard_dir`` lives: beside it, in the run folder."""
    return Path(shard_dir).parent / MANIFEST


def write_manifest(shard_dir: Path, manifest: dict) -> None:
    write_json(manifest_path(shard_dir), manifest)


def read_manifest(shard_dir: Path, missing_ok: bool = False) -> dict | None:
    """The manifest of ``shard_dir``; where there is none, None if ``missing_ok``, else an error
    (always an error for an older run's manifest inside the folder, which needs a rerun)."""
    path, old = manifest_path(shard_dir), Path(shard_dir) / MANIFEST
    if path.is_file():
        return json.loads(path.read_text())
    if old.is_file():
        raise MissingManifestError(
            f"{old}: a manifest inside the shard folder, from an older curate (it stops the folder "
            f"loading as one table); rerun `curate batch` with this run's config to rewrite the "
            f"shards and {path} (cached stages are reused)"
        )
    if missing_ok:
        return None
    raise MissingManifestError(
        f"{path}: no manifest for {shard_dir}; the shards there are incomplete or absent (rerun "
        "`curate batch`)"
    )


def iter_batches(shard_dir: Path, start: int = 0) -> Iterator[tuple[int, pa.Table]]:
    """Yield (batch number, rows) in order, from batch ``start`` (a resume point) on."""
    manifest = read_manifest(shard_dir)
    b = 0
    for rec in manifest["files"]:
        if b + rec["batches"] <= start:
            b += rec["batches"]
            continue
        pf = pq.ParquetFile(Path(shard_dir) / rec["path"])
        for g in range(pf.num_row_groups):
            if b >= start:
                yield b, pf.read_row_group(g)
            b += 1
