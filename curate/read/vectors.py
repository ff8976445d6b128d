"""Bring your own embeddings: a vector column in the corpus and queries Parquet files
(``data.columns.vector``) stands in for the embed stage.

The read stage checks only the schema (the column is there, a list of floats, the same kind in
both files); the vectors themselves are read by worker tasks, one group of Parquet row groups
each, checked (dimension, finite, not zero) and written as unit vectors in ``.npy`` partition
files, so the driver never holds them. Rows are 0-based Parquet row indices, as everywhere in
curate's errors about Parquet.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate import storage
from curate.config import DataConfig
from curate.errors import DataError
from curate.files import read_arrow


def parquet_inputs(data: DataConfig) -> DataConfig:
    """With given vectors, a BEIR folder's corpus and queries default to ``corpus.parquet`` and
    ``queries.parquet`` (JSON lines hold no vector column)."""
    if not data.columns.vector:
        return data
    root = storage.location(data.path)
    return dataclasses.replace(data, corpus=data.corpus or str(root / "corpus.parquet"),
                               queries=data.queries or str(root / "queries.parquet"))


def parquet(path: str, options: storage.Options | None = None) -> pq.ParquetFile:
    """A Parquet file, local or behind an fsspec URL (read by range requests)."""
    if storage.is_url(path):
        fs, inner = storage.filesystem(path, options)
        return pq.ParquetFile(inner, filesystem=fs)
    return pq.ParquetFile(storage.local_path(path))


def identity(path: str, options: storage.Options | None = None) -> list[str]:
    """What tells this version of the file from another without reading it: name, size and
    change time (or the store's ETag)."""
    if storage.is_url(path):
        fs, inner = storage.filesystem(path, options)
        info = fs.info(inner)
        return [path, str(info.get("size")), str(info.get("ETag") or info.get("LastModified")
                                                  or info.get("mtime"))]  # fmt: skip
    p = Path(storage.local_path(path))
    st = p.stat()
    return [str(p.resolve()), str(st.st_size), str(st.st_mtime_ns)]


_FLOATS = (pa.float16(), pa.float32(), pa.float64())
_FIX_TYPE = "store each row's embedding as a list of floats (list<float32> or fixed_size_list)"


def check_schema(path: str, column: str, options: storage.Options | None = None) -> None:
    """Fail before any work when ``path`` cannot hold vectors in ``column``."""
    where = storage.location(str(path), options)
    if where.suffix != ".parquet":
        problem = f"data.columns.vector is set ({column!r}) but {where.name} is not Parquet"
        raise DataError(str(path), problem, "write the file as Parquet with a vector column")
    if not where.is_file():
        fix = "check data.path, data.corpus and data.queries"
        raise DataError(str(path), "file not found", fix)
    schema = parquet(str(path), options).schema_arrow
    if column not in schema.names:
        problem = f"no vector column {column!r} (found {schema.names})"
        raise DataError(str(path), problem, "set data.columns.vector to the column's name")
    kind = schema.field(column).type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)
            or pa.types.is_fixed_size_list(kind)) or kind.value_type not in _FLOATS:  # fmt: skip
        raise DataError(str(path), f"vector column {column!r} is {kind}", _FIX_TYPE)


def row_group_blocks(pf: pq.ParquetFile, rows_per_task: int) -> list[tuple[int, int, int]]:
    """-> [(first row group, last row group + 1, first row)] of about ``rows_per_task`` rows each:
    what one task reads (metadata only: the footer)."""
    meta = pf.metadata
    blocks, start, first_row, rows = [], 0, 0, 0
    for g in range(meta.num_row_groups):
        rows += meta.row_group(g).num_rows
        if rows >= rows_per_task or g == meta.num_row_groups - 1:
            blocks.append((start, g + 1, first_row))
            start, first_row, rows = g + 1, first_row + rows, 0
    return blocks


def dimension(pf: pq.ParquetFile, column: str) -> int:
    """The vector length of the first row (the list type's size when fixed): the shape of the
    file the tasks fill, read from the footer and one row."""
    kind = pf.schema_arrow.field(column).type
    if pa.types.is_fixed_size_list(kind):
        return kind.list_size
    first = next(pf.iter_batches(batch_size=1, columns=[column]), None)
    if first is None or not first.num_rows or first.column(0).is_null().to_pylist()[0]:
        return 0  # empty file or a null first vector: read_block names the problem
    return len(first.column(0)[0])


def read_block(path: str, id_column: str, column: str, groups: tuple[int, int], first_row: int,
               dim: int, out_path: str, options: storage.Options | None = None) -> int:
    """One task: row groups [a, b) of ``path`` -> rows [first_row, ...) of ``out_path`` (a
    ``.npy`` of the whole file's rows, unit float32, that every block's task fills in place)
    and ``<out_path>.<first_row>.ids.parquet``, the rows' ids, written last: it marks the block
    done. -> rows."""
    table = parquet(path, options).read_row_groups(range(*groups), columns=[id_column, column])
    vecs = _matrix(table.column(column).combine_chunks(), path, column, first_row, dim)
    norms = np.linalg.norm(vecs, axis=1)
    if (bad := np.flatnonzero(norms == 0)).size:
        raise DataError(path, f"the vector in {column!r} is all zeros", "drop the row or fix its "
                        "embedding: a zero vector has no direction to compare", first_row + bad[0])
    out = np.load(out_path, mmap_mode="r+")
    out[first_row : first_row + len(vecs)] = vecs / norms[:, None]
    out.flush()
    del out
    ids = pa.table({"id": table.column(id_column).cast(pa.string())})
    pq.write_table(ids, block_ids(out_path, first_row))
    return len(vecs)


def block_ids(out_path: str, first_row: int) -> str:
    return f"{out_path}.{first_row:012d}.ids.parquet"


def _matrix(arr: pa.Array, path: str, column: str, first_row: int, dim: int | None) -> np.ndarray:
    """[rows, dim] float32 from a list column, each row checked (null, length, finite)."""
    if arr.null_count:
        row = first_row + int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(path, f"the vector in {column!r} is null", "give every row a vector", row)
    if pa.types.is_fixed_size_list(arr.type):
        lengths = np.full(len(arr), arr.type.list_size)
        values = arr.flatten()
    else:
        offsets = arr.offsets.to_numpy()
        lengths = np.diff(offsets)
        values = arr.values.slice(offsets[0], offsets[-1] - offsets[0])
    want = dim if dim is not None else (int(lengths[0]) if len(lengths) else 0)
    if (bad := np.flatnonzero(lengths != want)).size:
        problem = f"the vector in {column!r} has {lengths[bad[0]]} values where rows have {want}"
        raise DataError(path, problem, "give every row (corpus and queries) one dimension",
                        first_row + int(bad[0]))
    if values.null_count:
        raise DataError(path, f"a vector in {column!r} holds a null value", "fill in the value")
    flat = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    vecs = flat.reshape(len(arr), want)
    if not (finite := np.isfinite(vecs).all(axis=1)).all():
        row = first_row + int(np.flatnonzero(~finite)[0])
        raise DataError(path, f"the vector in {column!r} holds NaN or inf", "recompute the "
                        "embedding of that row, or drop the row", row)
    return vecs


def assemble(file_rows: str, first_rows: list[int], order_path: str, out_path: str) -> int:
    """One task: the file-order vectors ``file_rows`` -> ``out_path`` in the order of the ids in
    ``order_path`` (the rows the read stage kept). When that is the file's order (no empty text
    skipped), the file is renamed, not copied. -> rows."""
    import polars as pl

    ids = pl.concat([pl.read_parquet(block_ids(file_rows, r)) for r in first_rows])
    want = pl.from_arrow(read_arrow(order_path))
    if ids["id"].equals(want["id"]):
        Path(file_rows).replace(out_path)
        return want.height
    where = ids.with_row_index("src").join(want.with_row_index("dst"), on="id")
    if where.height != want.height:  # the read stage's ids come from the same files
        raise DataError(order_path, f"{want.height - where.height} kept rows have no vector",
                        "rerun: the input files changed during the run")
    src = where.sort("dst")["src"].to_numpy()
    vecs = np.load(file_rows, mmap_mode="r")
    out = np.lib.format.open_memmap(out_path + ".tmp", "w+", np.float32, (len(src), vecs.shape[1]))
    for a in range(0, len(src), 65536):  # a chunk in memory at a time
        out[a : a + 65536] = vecs[src[a : a + 65536]]
    out.flush()
    del out, vecs
    Path(out_path + ".tmp").replace(out_path)
    Path(file_rows).unlink()
    return want.height
