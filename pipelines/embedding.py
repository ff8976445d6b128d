"""The embed stage on the cluster: texts to vectors (or given vectors read from the inputs).

Tasks take paths and row ranges and write their output to files (the scheduler carries no
text or vector): tokenizing and embedding tasks read one Arrow file of the texts, a last task
joins the partitions into one input-ordered ``.npy`` that the driver memory-maps. Each task
writes one content-addressed file atomically, so a rerun or a retried task repeats nothing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from itertools import chain
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from curate.config import EmbedConfig
from curate.embed import encoder as embed
from curate.embed import plan as embed_plan
from curate.files import atomic_path, slices, write_arrow, write_table
from curate.read.stage import text_list
from curate.records import id_series
from curate.text import content_hash
from pipelines.cluster import Workers, gather

log = logging.getLogger(__name__)


def embed_texts(
    workers: Workers,
    ids: list[str],
    texts: list[str],
    prefix: str,
    model_path: Path,
    model_fp: str,
    cfg: EmbedConfig,
    cache_dir: Path,
) -> tuple[list[str], np.ndarray]:
    """Embed on the cluster, one task per partition of the embedding plan (curate/embed/plan.py:
    batches cut over all texts, so no vector depends on ``partition_size``);
    -> (ids, [N, D] float32, memory-mapped) in input order. Tasks read their texts from one Arrow
    file by row range and write their vectors to files: no text or vector is a task argument or
    result."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    texts = text_list(texts)  # an Arrow or polars column: the plan below takes texts by row
    settings = {k: v for k, v in asdict(cfg).items() if k != "partition_size"}
    settings = json.dumps({**settings, "compute_dtype": embed.local_dtype(cfg)}, sort_keys=True)
    source = _TextsFile(cache_dir, ids, texts)
    lengths = _token_lengths(workers, source, prefix, model_path, model_fp, cfg, cache_dir)
    parts = embed_plan.plan(lengths, embed_plan.text_hashes(texts, prefix), cfg.token_budget,
                            cfg.partition_size)
    todo, paths, at = [], [], 0
    for part in parts:
        part_ids, part_texts = [ids[i] for i in part.rows], [texts[i] for i in part.rows]
        sizes = ",".join(map(str, part.sizes))
        key = content_hash([model_fp, settings, prefix, sizes, *part_ids, *part_texts])
        path = cache_dir / f"{key}.parquet"
        paths.append(path)
        if not path.exists():
            todo.append((key, path, (at, at + len(part.rows)), part.sizes))
        at += len(part.rows)
    futures = []
    if todo:
        plan_key = content_hash([source.key, prefix, *(p.name for p in paths)])
        plan_path = cache_dir / f"plan-{plan_key}.npy"
        rows = np.concatenate([p.rows for p in parts]).astype(np.int64)
        with atomic_path(plan_path, ".tmp.npy") as tmp:
            np.save(tmp, rows)
        futures = [
            workers.client.submit(
                embed.embed_rows, source.path(), str(plan_path), span, str(path), str(model_path),
                cfg, prefix, workers.torch_threads, sizes, key=f"embed-{key}", pure=False,
            )
            for key, path, span, sizes in todo
        ]  # fmt: skip
    log.info("embedding %d texts: %d of %d partitions cached", len(ids), len(paths) - len(todo),
             len(paths))  # fmt: skip
    gather(workers, futures, f"embed ({cache_dir.name})")
    if todo:
        plan_path.unlink(missing_ok=True)
    source.drop()
    return list(ids), _joined(workers, paths, parts, ids, cache_dir)


class _TextsFile:
    """The texts of one ``embed_texts`` call as an Arrow file in the cache folder, written on
    first use (a fully cached call writes none) and removed when the call ends."""

    def __init__(self, cache_dir: Path, ids: list[str], texts: list[str]):
        self.cache_dir, self.ids, self.texts = cache_dir, ids, texts
        self.key = content_hash([*ids, "\x1e", *texts])
        self._path: Path | None = None

    def path(self) -> str:
        if self._path is None:
            self._path = self.cache_dir / f"texts-{self.key}.arrow"
            embed.write_texts(self._path, self.ids, self.texts)
        return str(self._path)

    def drop(self) -> None:
        if self._path is not None:
            self._path.unlink(missing_ok=True)


def _joined(workers: Workers, paths: list[Path], parts: list, ids: list[str],
            cache_dir: Path) -> np.ndarray:
    """The partitions joined into one input-ordered ``.npy`` by a task (cached by the partition
    files' names, which are content hashes), memory-mapped here: the driver holds no vector."""
    key = content_hash([p.name for p in paths] + [str(len(ids))])
    out = cache_dir / f"vectors-{key}.npy"
    if out.exists():
        return np.load(out, mmap_mode="r")
    spec = {"parts": [str(p) for p in paths], "ids": str(cache_dir / f"vectors-{key}.ids.pq"),
            "rows": str(cache_dir / f"vectors-{key}.rows.npy")}  # fmt: skip
    rows = np.concatenate([p.rows for p in parts]) if parts else np.empty(0, np.int64)
    np.save(spec["rows"], rows.astype(np.int64))
    write_table(Path(spec["ids"]), pa.table({"id": pa.array(ids, pa.string())}))
    spec_path = cache_dir / f"vectors-{key}.json"
    spec_path.write_text(json.dumps(spec))
    workers.client.submit(embed.assemble_embeddings, str(spec_path), str(out), key=f"join-{key}",
                          pure=False).result()  # fmt: skip
    for name in (spec_path, spec["rows"], spec["ids"]):  # scaffolding of the task, not cache
        Path(name).unlink()
    return np.load(out, mmap_mode="r")


def _token_lengths(workers: Workers, source: _TextsFile, prefix: str, model_path: Path,
                   model_fp: str, cfg: EmbedConfig, cache_dir: Path) -> np.ndarray:
    """[N] token lengths, tokenized on the cluster in contiguous chunks (each task writes its
    chunk to a file); kept in ``cache_dir`` keyed by tokenizer, max_length and texts, so a rerun
    that finds every partition cached needs no model."""
    key = content_hash([model_fp, str(cfg.max_length), prefix, *source.texts])
    path = cache_dir / f"lengths-{key}.npy"
    if path.exists():
        return np.load(path)
    step = max(cfg.partition_size, 1024)  # chunking only splits the work
    n = len(source.texts)
    futures = [
        workers.client.submit(
            embed.lengths_rows, source.path(), (start, min(start + step, n)), str(model_path),
            cfg, prefix, workers.torch_threads, str(cache_dir / f"lengths-{key}-{start}.npy"),
            key=f"lengths-{key}-{start}", pure=False,
        )
        for start in range(0, n, step)
    ]  # fmt: skip
    chunks = [Path(p) for p in gather(workers, futures, "tokenize")]
    lengths = np.concatenate([np.empty(0, np.int32), *(np.load(p) for p in chunks)])
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, lengths)
    for p in chunks:
        p.unlink()
    return lengths


def given_vectors(workers: Workers, path: str, id_column: str, column: str, ids: pl.Series,
                  cache_dir: Path, rows_per_task: int, options: dict | None = None) -> np.ndarray:
    """The vectors of ``path``'s ``column`` for ``ids`` (in that order): one task per group of
    row groups fills its rows of one file-order ``.npy`` in place, a last task puts them in
    ``ids``' order (a rename when that is the file's order); -> that file memory-mapped, so the
    driver holds no vector, and one copy of them is on disk. Keyed by the file's name, size and
    change time; a rerun after a crash reads only the blocks not yet marked done."""
    from curate.read import vectors

    cache_dir.mkdir(parents=True, exist_ok=True)
    key = content_hash([*vectors.identity(path, options), column])
    order_key = content_hash(chain([key], ids))  # streamed: no list of every id
    out = cache_dir / f"given-{order_key}.npy"
    if out.exists():
        return np.load(out, mmap_mode="r")
    pf = vectors.parquet(path, options)
    blocks = vectors.row_group_blocks(pf, rows_per_task)
    rows_file = cache_dir / f"given-{key}.file-order.npy"
    dim, n = vectors.dimension(pf, column), pf.metadata.num_rows
    if not rows_file.exists() or np.load(rows_file, mmap_mode="r").shape != (n, dim):
        with atomic_path(rows_file, ".tmp.npy") as tmp:  # sparse until the tasks fill it
            np.lib.format.open_memmap(tmp, "w+", np.float32, (n, dim)).flush()
    futures = [
        workers.client.submit(vectors.read_block, path, id_column, column, (a, b), first, dim,
                              str(rows_file), options, key=f"vectors-{key}-{a}", pure=False)
        for a, b, first in blocks
        if not Path(vectors.block_ids(str(rows_file), first)).exists()
    ]  # fmt: skip
    gather(workers, futures, f"vectors ({path.rsplit('/', 1)[-1]})")
    order = cache_dir / f"given-{order_key}.ids.arrow"
    write_arrow(order, (pa.table({"id": part.to_arrow().cast(pa.string())})
                        for part in slices(id_series(ids))))  # fmt: skip
    firsts = [first for _, _, first in blocks]
    workers.client.submit(vectors.assemble, str(rows_file), firsts, str(order), str(out),
                          key=f"vectors-{order_key}", pure=False).result()  # fmt: skip
    for first in firsts:  # the blocks' done-marks and the order: scaffolding
        Path(vectors.block_ids(str(rows_file), first)).unlink(missing_ok=True)
    order.unlink()
    return np.load(out, mmap_mode="r")
