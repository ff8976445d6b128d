"""Dask mappings of the partitioned stages (embed, mine). Each task is idempotent: it writes one
content-addressed file atomically and returns its path, so a rerun or a retried task after a lost
worker finds finished partitions on disk and repeats nothing."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from curate import faults, schema
from curate.config import Config, EmbedConfig, IndexConfig, MineConfig
from curate.embed import encoder as embed
from curate.embed import plan as embed_plan
from curate.errors import DataError
from curate.files import atomic_path, npy_file, write_table
from curate.index import build as index
from curate.index import stage as index_files
from curate.mine import negatives as mine
from curate.mine import stage as mine_logic
from curate.progress import track
from curate.records import Embedded, Indexed, Mined, Model, Read
from curate.text import content_hash
from pipelines.cluster import Workers

log = logging.getLogger(__name__)


def _gather(workers: Workers, futures: list, desc: str) -> list:
    from distributed import as_completed

    for _ in track(as_completed(futures), total=len(futures), desc=desc):
        faults.reached(desc.split()[0])  # test-only crash point: "embed", "index", "mine"
    return workers.client.gather(futures)


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
    _gather(workers, futures, f"embed ({cache_dir.name})")
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
    chunks = [Path(p) for p in _gather(workers, futures, "tokenize")]
    lengths = np.concatenate([np.empty(0, np.int32), *(np.load(p) for p in chunks)])
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, lengths)
    for p in chunks:
        p.unlink()
    return lengths


# --- index: one file per contiguous shard of the corpus -----------------------------------


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
    index.add_in_chunks(shard, np.load(vecs_path, mmap_mode="r")[start:stop])
    index.save_index(shard, Path(out_path))
    return out_path


def build_index_shards(
    workers: Workers, work_dir: Path, icfg: IndexConfig, seed: int
) -> list[Path]:
    """Train once here on a sample of ``doc_vecs.npy`` (so every shard shares one quantizer), then
    fill one index per contiguous shard of the corpus in a Dask task each."""
    doc_vecs = np.load(work_dir / "doc_vecs.npy", mmap_mode="r")
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
    _gather(workers, futures, "index")
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
    doc_vecs = np.load(work_dir / "doc_vecs.npy", mmap_mode="r")
    nprobe, rec = recall.guard(index.join_shards(shards), doc_vecs, queries, k, icfg, seed)
    return nprobe, {**rec, "shards": len(shards)}


# --- mine: a search task per (query block, shard), then one mine task per block ----------


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
    doc_vecs = np.load(files.doc_vecs, mmap_mode="r")
    doc_hash = np.load(files.doc_hash, mmap_mode="r")
    doc_ids = pq.ParquetFile(files.doc_ids).read().column("doc_id").to_pylist()
    # Per-shard hits -> the exact global top-k (ties on the lower doc number): one code path
    # whatever the shard count, so sharded and unsharded flat runs mine the same negatives.
    scores, cands = index.merge_topk(parts, offsets, mcfg.top_k)
    res = mine.mine_block(block, scores, cands, doc_vecs, doc_hash, mcfg, seed)
    table = pa.table(
        {
            "query_id": [block.query_ids[block.pair_query[p]] for p in res.pair],
            "pos_id": block.pos_ids,
            "pos_score": pa.array(res.pos_score, pa.float32()),
            "neg_ids": [[doc_ids[d] for d in n] for n in res.neg_docs],
            "neg_scores": pa.array([s.tolist() for s in res.neg_scores], pa.list_(pa.float32())),
            "neg_ranks": pa.array([r.tolist() for r in res.neg_ranks], pa.list_(pa.int32())),
        },
        schema=schema.MINED,
    )
    forbidden = pa.table(
        {
            "query_id": [block.query_ids[q] for q, _, _ in res.forbidden],
            "doc_id": [doc_ids[d] for _, d, _ in res.forbidden],
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
) -> tuple[pa.Table, pa.Table, Counter]:
    """Mine every block on the cluster -> (MINED table, FORBIDDEN table, filter funnel).

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
    search_key = content_hash([index_fp, settings, *(q for b in blocks for q in b.query_ids)])
    ends = np.cumsum([len(b.query_ids) for b in blocks], dtype=np.int64)
    todo = []
    for block, stop in zip(blocks, ends.tolist()):
        key = content_hash([index_fp, settings, *block.query_ids, *block.pos_ids])
        todo.append((block, stop, part_dir / f"{key}.parquet", key))
    paths = [t[2] for t in todo]
    if missing := [t for t in todo if not t[2].exists()]:
        files = MineFiles(*(str(work_dir / n) for n in ("doc_vecs.npy", "doc_hash.npy",
                                                         "doc_ids.parquet")),
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
        _gather(workers, futures, "mine")
        shutil.rmtree(hits_dir, ignore_errors=True)  # scaffolding: the partitions hold the result
        for _, _, _, key in missing:
            (part_dir / f"{key}.block.npz").unlink(missing_ok=True)
    else:
        log.info("mining %d query blocks: %d cached", len(blocks), len(blocks))
    tables, forbidden, funnel = [], [], Counter()
    for path in paths:
        t = pq.ParquetFile(path).read()
        meta = t.schema.metadata
        funnel.update(json.loads(meta[b"funnel"]))
        forbidden.append(pq.ParquetFile(_forbidden_path(path)).read())
        tables.append(t.replace_schema_metadata(None))
    return pa.concat_tables(tables), pa.concat_tables(forbidden), funnel


# --- given vectors (data.columns.vector): read from the inputs by the workers -------------


def given_vectors(workers: Workers, path: str, id_column: str, column: str, ids: list[str],
                  cache_dir: Path, rows_per_task: int, options: dict | None = None) -> np.ndarray:
    """The vectors of ``path``'s ``column`` for ``ids`` (in that order): one task per group of
    row groups fills its rows of one file-order ``.npy`` in place, a last task puts them in
    ``ids``' order (a rename when that is the file's order); -> that file memory-mapped, so the
    driver holds no vector, and one copy of them is on disk. Keyed by the file's name, size and
    change time; a rerun after a crash reads only the blocks not yet marked done."""
    from curate.read import vectors

    cache_dir.mkdir(parents=True, exist_ok=True)
    key = content_hash([*vectors.identity(path, options), column])
    order_key = content_hash([key, *ids])
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
    _gather(workers, futures, f"vectors ({path.rsplit('/', 1)[-1]})")
    order = cache_dir / f"given-{order_key}.ids.parquet"
    write_table(order, pa.table({"id": pa.array(ids, pa.string())}))
    firsts = [first for _, _, first in blocks]
    workers.client.submit(vectors.assemble, str(rows_file), firsts, str(order), str(out),
                          key=f"vectors-{order_key}", pure=False).result()  # fmt: skip
    for first in firsts:  # the blocks' done-marks and the order: scaffolding
        Path(vectors.block_ids(str(rows_file), first)).unlink(missing_ok=True)
    order.unlink()
    return np.load(out, mmap_mode="r")


def vectors_stage(workers: Workers, read: Read, cfg: Config, cache: Path) -> Embedded:
    """The embed stage when the inputs carry their vectors: docs then queries, checked to share
    a dimension."""
    from curate.read.vectors import parquet_inputs

    cols, data = cfg.data.columns, parquet_inputs(cfg.data)
    doc_ids, q_ids = read.corpus["doc_id"].to_list(), read.dataset.queries["query_id"].to_list()
    rows = max(cfg.embed.partition_size, 100_000)  # reading is cheap: fewer, larger tasks
    opts = dict(cfg.storage.options)
    docs = given_vectors(workers, data.corpus, cols.doc_id, cols.vector, doc_ids, cache / "given",
                         rows, opts)  # fmt: skip
    queries = given_vectors(workers, data.queries, cols.query_id, cols.vector, q_ids,
                            cache / "given", rows, opts)  # fmt: skip
    if docs.shape[1] != queries.shape[1]:
        raise DataError(data.queries, f"query vectors have {queries.shape[1]} dimensions, the "
                        f"corpus's {docs.shape[1]}", "embed both with the same model")
    return Embedded(doc_ids, docs, q_ids, queries)


# --- the stages on the cluster: records in, a record out (pipelines.run wires them) --------


def embed_stage(
    workers: Workers, read: Read, model: Model, ecfg: EmbedConfig, cache: Path
) -> Embedded:
    """Docs then queries, each cached per partition under ``cache``."""
    q = read.dataset.queries
    doc_ids, doc_vecs = embed_texts(
        workers,
        read.corpus["doc_id"].to_list(),
        read.texts,
        ecfg.doc_prefix,
        model.path,
        model.fingerprint,
        ecfg,
        cache / "docs",
    )
    q_ids, q_vecs = embed_texts(
        workers,
        q["query_id"].to_list(),
        q["text"].to_list(),
        ecfg.query_prefix,
        model.path,
        model.fingerprint,
        ecfg,
        cache / "queries",
    )
    return Embedded(doc_ids, doc_vecs, q_ids, q_vecs)  # fmt: skip


def index_stage(
    workers: Workers, work: Path, cfg: Config, read: Read, model: Model, emb: Embedded
) -> str:
    """Index plus the arrays mine tasks memory-map, skipped when the same embeddings are
    indexed; checked against the queries' model and dimension before any search. -> its
    fingerprint."""
    fp = index_files.fingerprint(cfg, model, emb)
    if not index_files.is_built(work, fp):
        index_files.write_inputs(work, read, emb)
        build_index_shards(workers, work, cfg.index, cfg.seed)  # one per contiguous shard
        index_files.mark_built(work, fp, cfg, model, emb)
    index.check_record(work, cfg.embed.model, model.fingerprint, emb.query_vecs.shape[1],
                       len(emb.doc_ids))  # fmt: skip
    return fp


def guard_stage(workers: Workers, work: Path, fp: str, cfg: Config, read: Read,
                emb: Embedded) -> Indexed:
    """Approximate indexes: recall@k of a sample of the train queries against brute force
    (nprobe raised or the run stopped below the floor), in a task: the brute force reads every
    doc vector."""
    from curate.index.recall import sample_rows

    train_q = read.pairs["query_id"].unique().to_list()
    rows = np.flatnonzero(np.isin(emb.query_ids, train_q))
    rows = rows[sample_rows(len(rows), cfg.index.recall_sample, cfg.seed)]  # the guard's sample
    sample = work / "guard-queries.npy"
    np.save(sample, np.asarray(emb.query_vecs[rows], np.float32))
    nprobe, recall = workers.client.submit(
        _guard_task, str(work), str(sample), cfg.mine.top_k, cfg.index, cfg.seed,
        workers.torch_threads, key=f"guard-{fp}", pure=False,
    ).result()  # fmt: skip
    sample.unlink()
    return Indexed(work, fp, replace(cfg.index, nprobe=nprobe), recall)


def _guard_task(work: str, queries: str, k: int, icfg: IndexConfig, seed: int, threads: int):
    import faiss

    faiss.omp_set_num_threads(threads)
    return guard_index(Path(work), np.load(queries), k, icfg, seed)


def mine_stage(workers: Workers, cfg: Config, read: Read, emb: Embedded, indexed: Indexed) -> Mined:
    """The ceiling calibrated (when asked), then every block mined on the cluster."""
    blocks = mine_logic.blocks(read, emb, indexed, cfg.mine.query_partition)
    mcfg, cal = mine_logic.calibrate_ceiling(cfg, read, emb, indexed)
    pairs, forbidden, funnel = mine_pairs(workers, blocks, emb.query_vecs, indexed.work,
                                          indexed.fingerprint, indexed.index, mcfg, cfg.seed)
    return Mined(pairs, forbidden, funnel, read.known, mcfg, cal, {})  # fmt: skip


def topics_stage(workers: Workers, cfg: Config, emb: Embedded, mined: Mined,
                 work: Path) -> dict[str, int]:
    """Each training query's topic, k-means over their vectors in a task (half a million
    queries at MS MARCO scale are 0.8 GB of vectors the driver should not hold)."""
    from curate.batch.stage import train_queries

    train_q = train_queries(mined)
    q_row = emb.query_row
    rows = np.array([q_row[q] for q in train_q], dtype=np.int64)
    src = npy_file(emb.query_vecs)
    if src is None:  # vectors handed in memory (the Python API): the driver writes them
        src = str(work / "topic-source.npy")
        np.save(src, np.asarray(emb.query_vecs, np.float32))
    np.save(work / "topic-rows.npy", rows)
    labels = workers.client.submit(
        _topics_task, src, str(work / "topic-rows.npy"), cfg.batch, cfg.seed,
        str(work / "topics.npy"), workers.torch_threads, key=f"topics-{content_hash(train_q)}",
        pure=False,
    ).result()  # fmt: skip
    topic_of = dict(zip(train_q, np.load(labels).tolist()))
    for name in ("topic-rows.npy", "topics.npy", "topic-source.npy"):
        (work / name).unlink(missing_ok=True)
    return topic_of


def _topics_task(src: str, rows: str, bcfg, seed: int, out: str, threads: int) -> str:
    import faiss

    from curate.batch.curation import topic_labels

    faiss.omp_set_num_threads(threads)
    vecs = np.asarray(np.load(src, mmap_mode="r")[np.load(rows)], np.float32)
    np.save(out, topic_labels(vecs, bcfg, seed))
    return out


def train_stage(cfg: Config, out: Path, model: Model) -> Path:
    from train.train import train

    return train(out / "shards", out / "model", model.path, cfg.train, cfg.embed, cfg.seed)


def evaluate_stage(
    workers: Workers, cfg: Config, read: Read, cache: Path, model: Model, trained: str | None
) -> dict:
    """Base model and trained model side by side on the held-out split."""
    from curate.eval.evaluate import evaluate

    qrels = read.dataset.qrels[cfg.data.eval_split]
    qids = sorted(qrels["query_id"].unique().to_list())[: cfg.eval.max_queries]
    qrels = qrels.filter(pl.col("query_id").is_in(qids))
    qtext = read.query_text
    doc_ids = read.dataset.corpus["doc_id"].to_list()
    e, results = cfg.embed, {}
    for name, path in [("base", model.path), ("trained", trained)]:
        if path is None:
            continue
        path = Path(path)
        fp = model.fingerprint if name == "base" else embed.model_fingerprint(path)
        _, dv = embed_texts(workers, doc_ids, read.texts, e.doc_prefix, path, fp, e, cache / "docs")
        _, qv = embed_texts(workers, qids, [qtext[q] for q in qids], e.query_prefix, path, fp, e,
                            cache / "queries")  # fmt: skip
        results[name] = evaluate(qids, qv, doc_ids, dv, qrels)
        log.info("%s: %s", name, results[name])
    return results
