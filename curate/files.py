"""Atomic files: everything curate writes goes to a temporary name beside its final one and is
renamed into place, so a reader (or a rerun after a crash) sees the old file or the new one,
never half of one. The only place that spells write-temp-then-rename."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PARQUET_OPTS = dict(compression="zstd", compression_level=3, write_statistics=False)


@contextmanager
def atomic_path(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary file name beside ``path`` (``<name><suffix>``) to write in the block; renamed
    over ``path`` when the block ends. A block that raises leaves ``path`` as it was."""
    tmp = path.with_name(path.name + suffix)
    yield tmp
    os.replace(tmp, path)


@contextmanager
def atomic_dir(path: Path, tmp: Path | None = None) -> Iterator[Path]:
    """A fresh temporary folder (``tmp``, default ``<name>.tmp`` beside ``path``) to fill in the
    block; it then replaces ``path`` and everything in it."""
    tmp = tmp or path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    if not path.exists():
        os.replace(tmp, path)
        return
    # os.replace cannot rename over a non-empty folder: move the old one aside first, so there
    # is never a moment without one.
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: Path, obj: dict) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_table(path: Path, table: pa.Table, **options) -> None:
    """Parquet with curate's options (zstd, no statistics) unless ``options`` says otherwise."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **(options or PARQUET_OPTS))


def slices(values, rows: int = 1 << 20):
    """``values`` (Arrow or a polars Series) ``rows`` at a time, zero-copy; one empty slice when
    there are none. Converting or writing a column of 10M ids whole holds a second copy of it."""
    return (values.slice(a, rows) for a in range(0, max(len(values), 1), rows))


def write_arrow(path: Path, tables) -> None:
    """Arrow IPC file of ``tables`` (one table, or an iterable of tables of one schema, each
    written as it comes: the whole never needs to be in memory), written then renamed."""
    tables = iter([tables] if isinstance(tables, pa.Table) else tables)
    first = next(tables)
    with atomic_path(path) as tmp, pa.OSFile(str(tmp), "wb") as sink, \
            pa.ipc.new_file(sink, first.schema) as w:  # fmt: skip
        w.write_table(first)
        for t in tables:
            w.write_table(t)


def read_arrow(path: str | Path) -> pa.Table:
    """An Arrow IPC file memory-mapped: pages are read when a column is touched."""
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def npy_file(vecs) -> str | None:
    """The ``.npy`` file the array ``vecs`` memory-maps whole (what the embed stage hands on),
    else None: then the array lives in memory only."""
    import numpy as np

    if not isinstance(vecs, np.memmap) or not str(vecs.filename or "").endswith(".npy"):
        return None
    whole = np.load(vecs.filename, mmap_mode="r")
    same = whole.shape == vecs.shape and whole.offset == vecs.offset and whole.dtype == vecs.dtype
    return str(vecs.filename) if same else None


def _npy_header(fh, path) -> tuple[tuple[int, int], object, int]:
    """(shape, dtype, data offset) of the 2-D C-order ``.npy`` open as ``fh``."""
    import numpy as np

    version = np.lib.format.read_magic(fh)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
        np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(fh)
    if len(shape) != 2 or fortran:
        raise ValueError(f"{path}: want a 2-D C-order array, found shape {shape}"
                         f"{' in Fortran order' if fortran else ''}")  # fmt: skip
    return shape, dtype, fh.tell()


def npy_chunks(path: str | Path, start: int, stop: int, chunk: int = 1 << 16) -> Iterator:
    """Rows [start, stop) of a 2-D C-order ``.npy`` file, ``chunk`` rows at a time, by plain
    reads. A memory map would leave every page it touched in the process's RSS, which Dask's
    nanny counts: filling a 10M x 384 index from a mapped 15 GB file got the worker restarted
    at 95% of its memory limit, again and again; read pages stay in the page cache instead."""
    import numpy as np

    with open(path, "rb") as fh:
        (n_rows, width), dtype, header = _npy_header(fh, path)
        stop = min(stop, n_rows)
        for a in range(start, stop, chunk):
            n = min(chunk, stop - a)
            fh.seek(header + a * width * dtype.itemsize)
            rows = np.fromfile(fh, dtype=dtype, count=n * width)
            if rows.size != n * width:
                raise ValueError(f"{path}: truncated at row {a + rows.size // max(width, 1)}")
            yield rows.reshape(n, width)


class NpyRows:
    """A 2-D ``.npy`` file whose rows are read when indexed (a slice or row numbers), by plain
    reads as in ``npy_chunks``: the index training sample of a 15 GB file without mapping it."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        with open(self.path, "rb") as fh:
            self.shape, self.dtype, self._header = _npy_header(fh, self.path)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows):
        import numpy as np

        if isinstance(rows, slice):
            start, stop, step = rows.indices(self.shape[0])
            if step != 1:
                raise IndexError("NpyRows takes a slice with step 1 or row numbers")
            got = list(npy_chunks(self.path, start, stop))
            return np.concatenate(got) if got else np.empty((0, self.shape[1]), self.dtype)
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.shape[0]):
            bad = rows[(rows < 0) | (rows >= self.shape[0])][0]
            raise IndexError(f"{self.path}: row {bad} of {self.shape[0]}")
        out = np.empty((len(rows), self.shape[1]), self.dtype)
        size = self.shape[1] * self.dtype.itemsize
        fd = os.open(self.path, os.O_RDONLY)
        try:  # each row read straight into its place in ``out``
            for r, row in zip(rows.tolist(), out.view(np.uint8)):
                if os.preadv(fd, [row], self._header + r * size) != size:
                    raise ValueError(f"{self.path}: truncated at row {r}")
        finally:
            os.close(fd)
        return out


class RowSubset:
    """Rows ``rows`` of a 2-D ``.npy`` file read once (``NpyRows``), then indexed by their row
    numbers in the file: the doc vectors one mine task needs (its candidates, positives and
    known positives), so the task neither maps the file nor holds more than its block's rows."""

    def __init__(self, path: str | Path, rows):
        import numpy as np

        self.path, self.rows = str(path), np.unique(np.asarray(rows, dtype=np.int64))
        self.data = NpyRows(path)[self.rows]

    def __getitem__(self, rows):
        import numpy as np

        at = np.searchsorted(self.rows, rows)
        if np.size(rows) and (not len(self.rows) or not np.array_equal(
                self.rows[np.minimum(at, len(self.rows) - 1)], rows)):  # fmt: skip
            raise KeyError(f"{self.path}: a row outside the {len(self.rows)} read was asked for")
        return self.data[at]
