"""Index, recall guard and mining on the cluster: one index file per contiguous shard of the
corpus, a search task per (query chunk, shard) and a mine task per query block.

Tasks take paths and row ranges: the query vectors are one stacked file, the blocks and each
search's hits are files in the work folder. Each mine task writes one content-addressed
partition atomically, so a rerun or a retried task after a lost worker repeats nothing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate import schema
from curate.config import IndexConfig, MineConfig
from curate.files import (
    NpyRows,
    RowSubset,
    atomic_path,
    npy_chunks,
    npy_file,
    write_arrow,
    write_table,
)
from curate.index import build as index
from curate.mine import negatives as mine
from curate.text import content_hash
from pipelines.cluster import Workers, gather

log = logging.getLogger(__name__)


def index_paths(work_dir: Path, shards: int) -> list[Path]:
    """``index.faiss`` unsharded (what the recall guard reads), else one file per shard."""
    if shards == 1:
        return [work_dir / "index.faiss"]
    return [work_dir / f"index.shard-{s:05d}-of-{shards:05d}.faiss" for s in range(shards)]


def _shard_layout(work_dir: Path, icfg: IndexConfig) -> tuple[list[Path], list[tuple[int, int]]]:
    n = np.load(work_dir / "doc_vecs.npy", mmap_mode="r").shape[0]
    bounds = index.shard_bounds(n, icfg.shards)
    return index_paths(work_dir, icfg.shards)[: len(bounds)], bounds


def _build_shard(
    trained: str, vecs_path: str, start: int, stop: int, out_path: str, threads: int
) -> str:
    import faiss

    faiss.omp_set_num_threads(threads)
    shard = faiss.read_index(trained)
    for rows in npy_chunks(vecs_path, start, stop):  # read, not mapped: see npy_chunks
        shard.add(np.ascontiguousarray(rows, dtype=np.float32))
    index.save_index(shard, Path(out_path))
    return out_path


def build_index_shards(
    workers: Workers, work_dir: Path, icfg: IndexConfig, seed: int
) -> list[Path]:
    """Train once here on a sample of ``doc_vecs.npy`` (so every shard shares one quantizer), then
    fill one index per contiguous shard of the corpus in a Dask task each."""
    doc_vecs = NpyRows(work_dir / "doc_vecs.npy")  # the sample read, not mapped: see npy_chunks
    trained = work_dir / "index.trained.faiss"
    index.save_index(index.trained_index(doc_vecs, icfg, seed), trained)
    paths, bounds = _shard_layout(work_dir, icfg)
    futures = [
        workers.client.submit(
            _build_shard,
            str(trained),
            str(work_dir / "doc_vecs.npy"),
            a,
            b,
            str(path),
            workers.torch_threads,
            key=f"index-{path.name}-{a}-{b}",
            pure=False,
        )
        for path, (a, b) in zip(paths, bounds)
    ]
    gather(workers, futures, "index")
    trained.unlink()
    log.info(
        "built %d index shard(s) of %s over %d docs",
        len(paths),
        index.choose_factory(*doc_vecs.shape, icfg),
        len(doc_vecs),
    )
    return paths


def guard_index(work_dir: Path, queries: np.ndarray, k: int, icfg: IndexConfig, seed: int):
    """``recall.guard`` on the whole (possibly sharded) index -> (nprobe, manifest record)."""
    from curate.index import recall

    if icfg.shards == 1:
        return recall.guard_work_dir(work_dir, queries, k, icfg, seed)
    paths, _ = _shard_layout(work_dir, icfg)
    shards = [index.load_index(p, icfg.nprobe) for p in paths]
    if recall.is_exact(shards[0]):  # flat shards: exact, the guard returns at once
        nprobe, rec = recall.guard(shards[0], None, queries, k, icfg, seed)
        return nprobe, {**rec, "k": min(k, sum(s.ntotal for s in shards)), "shards": len(shards)}
    doc_vecs = NpyRows(work_dir / "doc_vecs.npy")  # read, not mapped: see recall.guard_work_dir
    nprobe, rec = recall.guard(index.join_shards(shards), doc_vecs, queries, k, icfg, seed)
    return nprobe, {**rec, "shards": len(shards)}


_INDEXES: dict[tuple, object] = {}


def _loaded_index(path: str, nprobe: int, gpu: bool | str):
    """Index shards held by this worker process, keyed by file version so a rebuilt index is
    reloaded; on the GPU when ``gpu``; a ``curate.index.exact`` search when ``gpu`` is the
    index.use_gpu setting of a torch-exact run."""
    key = (path, os.stat(path).st_mtime_ns, nprobe, gpu)
    if key not in _INDEXES:
        for old in [k for k in _INDEXES if k[0] == path]:
            del _INDEXES[old]
        loaded = index.load_index(Path(path), nprobe)
        if isinstance(gpu, str):
            _INDEXES[key] = index.torch_exact(loaded, gpu)
        else:
            _INDEXES[key] = index.to_gpu(loaded, nprobe) if gpu else loaded
    return _INDEXES[key]


def release_indexes() -> None:
    """On a worker, once mining is over: drop the index shards its tasks loaded (4.9 GB at
    10M docs), so the batch stage's task does not sit beside them."""
    import gc

    _INDEXES.clear()
    gc.collect()


def _search_task(queries: np.ndarray, index_path: str, k: int, icfg: IndexConfig, threads: int):
    """Top-k of one query block in one shard -> (D [Q, k'], I [Q, k'] local to the shard)."""
    import faiss

    faiss.omp_set_num_threads(threads)
    if icfg.factory == index.TORCH_EXACT:
        import torch

        torch.set_num_threads(threads)
        searcher = _loaded_index(index_path, icfg.nprobe, icfg.use_gpu)
        index.check_query_dim(searcher, queries, index_path)
        return searcher.search(queries, k, icfg.query_block)
    gpu = index.gpu_for_k(index.use_gpu(icfg.use_gpu), k, index_path)
    shard = _loaded_index(index_path, icfg.nprobe, gpu)
    index.check_query_dim(shard, queries, index_path)
    return index.search(shard, queries, k, icfg.query_block)


def _search_file_task(queries: str, rows: tuple[int, int], index_path: str, k: int,
                      icfg: IndexConfig, threads: int, out_path: str) -> str:
    """``_search_task`` on rows [a, b) of the ``queries`` file; the hits go to ``out_path`` (.npz)
    and the path is the result, so no vector or hit list passes through the scheduler."""
    d, i = _search_task(np.load(queries, mmap_mode="r")[rows[0] : rows[1]], index_path, k, icfg,
                        threads)  # fmt: skip
    with atomic_path(Path(out_path), ".tmp.npz") as tmp:
        np.savez(tmp, d=d, i=i)
    return out_path


def _block_rows(chunks: list[list[str]], rows: tuple[int, int]) -> list[tuple]:
    """Per shard: the search grid chunks a block spans (their hit files), joined and cut to the
    block's rows."""
    a, b = rows
    out = []
    for files in chunks:
        hits = [np.load(f) for f in files]
        out.append((np.concatenate([h["d"] for h in hits])[a:b],
                    np.concatenate([h["i"] for h in hits])[a:b]))  # fmt: skip
    return out


@dataclass(frozen=True)
class MineFiles:
    """What every mine task reads, by path: the work folder's doc arrays and the stacked train
    query vectors (all blocks' queries in block order)."""

    doc_vecs: str
    doc_hash: str
    doc_ids: str
    queries: str


def _mine_task(block_path: str, out_path: str, chunks: list, rows: tuple[int, int],
               queries: tuple[int, int], offsets: list[int], files: MineFiles, mcfg: MineConfig,
               seed: int) -> str:
    """One block: its pairs from ``block_path`` (``negatives.save_block``), its query vectors rows
    ``queries`` of the stacked file, the per-shard hits from the search files -> the MINED and
    FORBIDDEN partition files."""
    path = Path(out_path)
    if path.exists():
        return out_path
    vecs = np.asarray(np.load(files.queries, mmap_mode="r")[queries[0] : queries[1]])
    block = mine.load_block(block_path, vecs)
    parts = _block_rows(chunks, rows)
    doc_hash = np.load(files.doc_hash, mmap_mode="r")
    # The mapped id column the negatives are taken from: as a Python list every task would hold
    # an object per document (10M at MS MARCO scale), as a Parquet read every id.
    doc_ids = mine.load_doc_ids(files.doc_ids)
    # Per-shard hits -> the exact global top-k (ties on the lower doc number): one code path
    # whatever the shard count, so sharded and unsharded flat runs mine the same negatives.
    scores, cands = index.merge_topk(parts, offsets, mcfg.top_k)
    # The block's doc vectors, read once: through a map, a block's random reads (with the
    # kernel's read-ahead) would leave most of a 15 GB file in the task's RSS.
    doc_vecs = RowSubset(files.doc_vecs, np.concatenate(
        [cands[cands >= 0], block.pair_pos[block.pair_pos >= 0], *block.known]))  # fmt: skip
    res = mine.mine_block(block, scores, cands, doc_vecs, doc_hash, mcfg, seed)
    table = pa.table(
        {
            "query_id": [block.query_ids[block.pair_query[p]] for p in res.pair],
            "pos_id": block.pos_ids,
            "pos_score": pa.array(res.pos_score, pa.float32()),
            "neg_ids": _ids_lists(doc_ids, res.neg_docs),
            "neg_scores": pa.array([s.tolist() for s in res.neg_scores], pa.list_(pa.float32())),
            "neg_ranks": pa.array([r.tolist() for r in res.neg_ranks], pa.list_(pa.int32())),
        },
        schema=schema.MINED,
    )
    forbidden = pa.table(
        {
            "query_id": [block.query_ids[q] for q, _, _ in res.forbidden],
            "doc_id": mine.take_strings(doc_ids, [d for _, d, _ in res.forbidden]),
            "reason": [r for _, _, r in res.forbidden],
            "score": pa.array(res.forbidden_scores, pa.float32()),
        },
        schema=schema.FORBIDDEN,
    )
    # The pairs file is written last: its presence marks the partition complete.
    write_table(_forbidden_path(path), forbidden)
    meta = {b"funnel": json.dumps(dict(res.funnel), sort_keys=True).encode()}
    write_table(path, table.replace_schema_metadata(meta))
    return out_path


def _ids_lists(doc_ids: pa.Array, rows: list) -> pa.ListArray:
    """Lists of doc numbers -> lists of their ids, one take over the id column."""
    offsets = np.zeros(len(rows) + 1, np.int32)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    flat = np.concatenate([np.asarray(r, np.int64) for r in rows]) if rows else np.zeros(0, int)
    return pa.ListArray.from_arrays(pa.array(offsets), mine.take_strings(doc_ids, flat))


def _forbidden_path(path: Path) -> Path:
    return path.with_name(path.stem + ".forbidden.parquet")


def _gather_rows(src: str, rows_path: str, out_path: str) -> str:
    """One task: rows ``rows_path`` (.npy) of the ``src`` vectors -> ``out_path``, in chunks."""
    vecs, rows = np.load(src, mmap_mode="r"), np.load(rows_path)
    out = np.lib.format.open_memmap(out_path + ".tmp", "w+", np.float32, (len(rows), vecs.shape[1]))
    for a in range(0, len(rows), 65536):
        out[a : a + 65536] = vecs[rows[a : a + 65536]]
    out.flush()
    del out
    os.replace(out_path + ".tmp", out_path)
    return out_path


class _SearchGrid:
    """Search tasks over fixed chunks of ``index.query_block`` queries, counted over the queries
    of all blocks in order: a query's hits never depend on which other queries share its mining
    block (BLAS sums a distance in an order set by how many queries share the call), and a chunk
    two small blocks share is searched once. Tasks are submitted on first use; each reads its
    rows of the stacked query file and writes its hits to a file under ``hits_dir``."""

    def __init__(self, workers: Workers, queries: str, total: int, shard_paths: list[Path],
                 homes: list[str], icfg: IndexConfig, k: int, key: str, hits_dir: Path):
        self.workers, self.queries, self.total = workers, queries, total
        self.shard_paths, self.homes, self.icfg, self.k, self.key = shard_paths, homes, icfg, k, key
        self.grid, self.hits_dir, self.chunks = icfg.query_block, hits_dir, {}

    def _chunk(self, c: int) -> list:
        if c not in self.chunks:
            rows = (c * self.grid, min((c + 1) * self.grid, self.total))
            self.chunks[c] = [
                self.workers.client.submit(
                    _search_file_task, self.queries, rows, str(sp), self.k, self.icfg,
                    self.workers.torch_threads, str(self.hits_dir / f"{self.key}-{c}-{s}.npz"),
                    key=f"search-{self.key}-{c}-{s}", pure=False, **_home(self.homes, s),
                )
                for s, sp in enumerate(self.shard_paths)
            ]  # fmt: skip
        return self.chunks[c]

    def rows(self, start: int, stop: int) -> tuple[list[list], tuple[int, int]]:
        """Per shard the chunk futures spanning queries [start, stop), and the rows to keep of
        the chunks joined."""
        first, last = start // self.grid, (stop - 1) // self.grid
        per_chunk = [self._chunk(c) for c in range(first, last + 1)]
        chunks = [[futs[s] for futs in per_chunk] for s in range(len(self.shard_paths))]
        return chunks, (start - first * self.grid, stop - first * self.grid)


def _home(homes: list[str], shard: int) -> dict:
    """Submit options that prefer worker ``shard`` mod #workers (any worker if it is gone)."""
    if not homes:
        return {}
    return {"workers": [homes[shard % len(homes)]], "allow_other_workers": True}


def _stacked_queries(workers: Workers, blocks: list[mine.PairBlock], query_vecs: np.ndarray,
                     part_dir: Path, key: str) -> str:
    """All blocks' query vectors in block order, one file written by a task from the run's
    query vectors file (the driver writes it only for vectors it was handed in memory)."""
    out = part_dir / f"queries-{key}.npy"
    if out.exists():
        return str(out)
    rows = np.concatenate([b.query_rows for b in blocks]).astype(np.int64)
    src = npy_file(query_vecs)
    if src is None:
        src = str(part_dir / f"queries-{key}.source.npy")
        np.save(src, np.asarray(query_vecs, np.float32))
    np.save(part_dir / f"queries-{key}.rows.npy", rows)
    workers.client.submit(_gather_rows, src, str(part_dir / f"queries-{key}.rows.npy"), str(out),
                          key=f"queries-{key}", pure=False).result()  # fmt: skip
    return str(out)


def mine_pairs(
    workers: Workers,
    blocks: list[mine.PairBlock],
    query_vecs: np.ndarray,
    work_dir: Path,
    index_fp: str,
    icfg: IndexConfig,
    mcfg: MineConfig,
    seed: int,
) -> tuple[Path, pa.Table, Counter]:
    """Mine every block on the cluster -> (the MINED table's Arrow file, FORBIDDEN table,
    filter funnel).

    Each block is searched in every index shard by its own task (shard s prefers worker s mod
    #workers, so a worker holds only its shards in memory); the block's mine task merges the
    per-shard hits into the global top-k and filters them. Tasks take paths and row ranges:
    the blocks, query vectors and hits travel as files, never through the scheduler."""
    part_dir = work_dir / "mined"
    part_dir.mkdir(parents=True, exist_ok=True)
    grid = icfg.query_block
    settings = json.dumps([asdict(mcfg), icfg.nprobe, seed, {"search_grid": grid}], sort_keys=True)
    shard_paths, bounds = _shard_layout(work_dir, icfg)
    offsets = [a for a, _ in bounds]
    homes = sorted(workers.client.scheduler_info()["workers"]) if len(shard_paths) > 1 else []
    # Streamed, not unpacked: a list would hold every query id as a Python string at once.
    search_key = content_hash(chain([index_fp, settings], (q for b in blocks for q in b.query_ids)))
    ends = np.cumsum([len(b.query_ids) for b in blocks], dtype=np.int64)
    todo = []
    for block, stop in zip(blocks, ends.tolist()):
        key = content_hash([index_fp, settings, *block.query_ids, *block.pos_ids])
        todo.append((block, stop, part_dir / f"{key}.parquet", key))
    paths = [t[2] for t in todo]
    if missing := [t for t in todo if not t[2].exists()]:
        files = MineFiles(*(str(work_dir / n) for n in ("doc_vecs.npy", "doc_hash.npy",
                                                         "doc_ids.arrow")),
                          _stacked_queries(workers, blocks, query_vecs, part_dir, search_key))
        hits_dir = part_dir / f"hits-{search_key}"
        hits_dir.mkdir(exist_ok=True)
        total = int(ends[-1]) if len(ends) else 0
        search = _SearchGrid(workers, files.queries, total, shard_paths, homes, icfg, mcfg.top_k,
                             search_key, hits_dir)  # fmt: skip
        futures = []
        for block, stop, path, key in missing:
            block_path = part_dir / f"{key}.block.npz"
            mine.save_block(block_path, block)
            start = stop - len(block.query_ids)
            chunks, rows = search.rows(start, stop)
            futures.append(workers.client.submit(
                _mine_task, str(block_path), str(path), chunks, rows, (start, stop), offsets,
                files, mcfg, seed, key=f"mine-{key}", pure=False,
            ))  # fmt: skip
        del search  # a chunk's hits are freed once the mine tasks that read them finish
        log.info("mining %d query blocks: %d cached", len(blocks), len(blocks) - len(futures))
        gather(workers, futures, "mine")
        shutil.rmtree(hits_dir, ignore_errors=True)  # scaffolding: the partitions hold the result
        for _, _, _, key in missing:
            (part_dir / f"{key}.block.npz").unlink(missing_ok=True)
    else:
        log.info("mining %d query blocks: %d cached", len(blocks), len(blocks))
    # The partitions streamed into one file the stages after map: the driver touches a few of
    # its columns, the batch stage's task reads it whole. Named by the partitions, so a rerun
    # over the same ones keeps it.
    forbidden, funnel = [], Counter()
    for path in paths:
        funnel.update(json.loads(pq.read_schema(path).metadata[b"funnel"]))
        forbidden.append(pq.ParquetFile(_forbidden_path(path)).read())
    pairs_file = part_dir / f"pairs-{content_hash([p.name for p in paths])}.arrow"
    if not pairs_file.exists():
        for old in part_dir.glob("pairs-*.arrow"):  # another run's settings
            old.unlink()
        parts = (pq.ParquetFile(p).read().replace_schema_metadata(None) for p in paths)
        write_arrow(pairs_file, parts if paths else schema.MINED.empty_table())
    return pairs_file, pa.concat_tables(forbidden), funnel
