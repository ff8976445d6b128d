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
from collections.abc import Callable, Iterator
from pathlib import Path

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


def write_shards(table: pa.Table, out_dir: Path, batches_per_shard: int,
                 fill: Callable[[pa.Table], pa.Table] | None = None) -> list[dict]:
    """``table`` (SHARD schema) sorted by batch_id -> shard files; returns their file records.
    ``fill``: a shard's rows -> its SHARD table (e.g. the texts looked up), called once per shard
    so that only one shard's worth of text is ever built."""
    if fill is None:
        schema.check(table, schema.SHARD, "shards")
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = written_here(out_dir)  # read before the manifest that lists them goes
    # The manifest goes first: a crash below must not leave an old manifest over new shards.
    manifest_path(out_dir).unlink(missing_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # where an older curate wrote it
    for name in stale:  # a rerun with other settings may write fewer shards
        (out_dir / name).unlink(missing_ok=True)
    batch_ids = table.column("batch_id").to_numpy()
    bounds = [0, *(i for i in range(1, len(batch_ids)) if batch_ids[i] != batch_ids[i - 1])]
    bounds.append(len(batch_ids))
    n_files = -(-(len(bounds) - 1) // batches_per_shard)
    names = [f"shard-{s:05d}.parquet" for s in range(n_files)]
    write_json(_ledger(out_dir), {"files": names})  # before any is written: a crash forgets none
    records = []
    for s, first in enumerate(range(0, len(bounds) - 1, batches_per_shard)):
        last = min(first + batches_per_shard, len(bounds) - 1)
        path = out_dir / f"shard-{s:05d}.parquet"
        part = table.slice(bounds[first], bounds[last] - bounds[first])
        if fill is not None:
            part = fill(part)
            schema.check(part, schema.SHARD, "shards")
        with atomic_path(path) as tmp, pq.ParquetWriter(tmp, part.schema, **PARQUET_OPTS) as w:
            for b in range(first, last):
                w.write_table(part.slice(bounds[b] - bounds[first], bounds[b + 1] - bounds[b]))
        faults.reached("shard")  # test-only crash point
        records.append(
            {"path": path.name, "batches": last - first, "rows": bounds[last] - bounds[first],
             "sha256": sha256(path)}
        )
    return records


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
