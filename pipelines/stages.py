"""Dask mappings of the partitioned stages (embed, mine). Each task is idempotent: it writes one
content-addressed file atomically and returns its path, so a rerun or a retried task after a lost
worker finds finished partitions on disk and repeats nothing."""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate import embed, index, mine, schema
from curate.config import EmbedConfig, IndexConfig, MineConfig
from curate.progress import track
from curate.shards import write_table
from curate.text import content_hash
from pipelines.cluster import Workers

log = logging.getLogger(__name__)


def _gather(workers: Workers, futures: list, desc: str) -> list:
    from distributed import as_completed

    for _ in track(as_completed(futures), total=len(futures), desc=desc):
        pass
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
    """Embed on the cluster, one task per partition; -> (ids, [N, D] float32) in input order."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    settings = json.dumps({k: v for k, v in asdict(cfg).items() if k != "partition_size"}, sort_keys=True)
    futures, paths = [], []
    for start in range(0, len(ids), cfg.partition_size):
        part_ids, part_texts = ids[start : start + cfg.partition_size], texts[start : start + cfg.partition_size]
        key = content_hash([model_fp, settings, prefix, *part_ids, *part_texts])
        path = cache_dir / f"{key}.parquet"
        paths.append(path)
        if path.exists():
            continue
        futures.append(
            workers.client.submit(
                embed.embed_partition, part_ids, part_texts, str(path), str(model_path), cfg,
                prefix, workers.torch_threads, key=f"embed-{key}", pure=False,
            )
        )
    log.info("embedding %d texts: %d of %d partitions cached", len(ids), len(paths) - len(futures), len(paths))
    _gather(workers, futures, f"embed ({cache_dir.name})")
    got_ids, vecs = embed.read_embeddings(paths)
    assert got_ids == ids, "embedding partitions out of order"
    return got_ids, vecs


@lru_cache(maxsize=2)
def _load_index(path: str, nprobe: int):
    return index.load_index(Path(path), nprobe)


def _mine_task(
    block: mine.PairBlock, out_path: str, index_path: str, vecs_path: str, hash_path: str,
    doc_ids_path: str, icfg: IndexConfig, mcfg: MineConfig, seed: int,
) -> str:
    path = Path(out_path)
    if path.exists():
        return out_path
    doc_vecs = np.load(vecs_path, mmap_mode="r")
    doc_hash = np.load(hash_path, mmap_mode="r")
    doc_ids = pq.read_table(doc_ids_path).column("doc_id").to_pylist()
    scores, cands = index.search(_load_index(index_path, icfg.nprobe), block.query_vecs, mcfg.top_k, icfg.query_block)
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


def mine_pairs(
    workers: Workers,
    blocks: list[mine.PairBlock],
    work_dir: Path,
    index_fp: str,
    icfg: IndexConfig,
    mcfg: MineConfig,
    seed: int,
) -> tuple[pa.Table, pa.Table, Counter]:
    """Mine every block on the cluster -> (MINED table, FORBIDDEN table, filter funnel)."""
    part_dir = work_dir / "mined"
    part_dir.mkdir(parents=True, exist_ok=True)
    settings = json.dumps([asdict(mcfg), icfg.nprobe, seed], sort_keys=True)
    args = [str(work_dir / n) for n in ("index.faiss", "doc_vecs.npy", "doc_hash.npy", "doc_ids.parquet")]
    futures, paths = [], []
    for block in blocks:
        key = content_hash([index_fp, settings, *block.query_ids, *block.pos_ids])
        path = part_dir / f"{key}.parquet"
        paths.append(path)
        if not path.exists():
            futures.append(
                workers.client.submit(
                    _mine_task, block, str(path), *args, icfg, mcfg, seed, key=f"mine-{key}", pure=False
                )
            )
    log.info("mining %d query blocks: %d cached", len(blocks), len(blocks) - len(futures))
    _gather(workers, futures, "mine")
    tables, forbidden, funnel = [], [], Counter()
    for path in paths:
        t = pq.read_table(path)
        meta = t.schema.metadata
        funnel.update(json.loads(meta[b"funnel"]))
        forbidden.append(pq.read_table(_forbidden_path(path)))
        tables.append(t.replace_schema_metadata(None))
    return pa.concat_tables(tables), pa.concat_tables(forbidden), funnel
