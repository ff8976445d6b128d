"""Stage 3: FAISS indexes over unit vectors (inner product = cosine) and streamed top-k search.

Flat (exact) by default; any ``index_factory`` string otherwise, trained on a seeded sample.
Queries are searched in blocks so memory is bounded by block x k, never queries x docs.
Sharded search keeps each shard's top-k and merges them to the exact global top-k.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import faiss
import numpy as np

from curate.config import IndexConfig
from curate.errors import ConfigError

log = logging.getLogger(__name__)


def choose_factory(n: int, dim: int, cfg: IndexConfig) -> str:
    """Flat below ``flat_max`` vectors; IVF with ~4 sqrt(N) lists and PQ codes above."""
    if cfg.factory != "auto":
        return cfg.factory
    if n <= cfg.flat_max:
        return "Flat"
    nlist = 1 << max(10, round(math.log2(4 * math.sqrt(n))))
    # Preferred sub-vector counts, then the largest divisor <= 96 (1024, 1536, 4096 dims need it).
    prefer = (dim // 4, dim // 8, dim // 2, dim, *range(96, 0, -1))
    m = next(m for m in prefer if m and dim % m == 0 and m <= 96)
    return f"IVF{nlist},PQ{m}x8"


def use_gpu(pref: str) -> bool:
    n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if pref == "always" and n == 0:
        raise ConfigError("index.use_gpu: 'always' but faiss sees no GPU; install curate[gpu]")
    on = pref != "never" and n > 0
    log.info("faiss device: %s", f"{n} GPU(s)" if on else "CPU")
    return on


def build_index(vectors: np.ndarray, cfg: IndexConfig, seed: int = 0) -> faiss.Index:
    """Index ``vectors`` ([N, D] float32, unit norm) with inner-product metric."""
    n, dim = vectors.shape
    factory = choose_factory(n, dim, cfg)
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise ConfigError(f"index.factory: faiss rejects {factory!r}: {err}") from err
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        take = min(n, cfg.train_sample)
        sample = vectors[np.sort(rng.choice(n, take, replace=False))] if take < n else vectors
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    set_search_params(index, cfg.nprobe)
    log.info("built %s index over %d vectors of dim %d", factory, n, dim)
    return index


def set_search_params(index: faiss.Index, nprobe: int) -> None:
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = nprobe
    hnsw = getattr(faiss.downcast_index(index), "hnsw", None)
    if hnsw is not None:
        hnsw.efSearch = max(hnsw.efSearch, nprobe)


def to_gpu(index: faiss.Index) -> faiss.Index:
    return faiss.index_cpu_to_all_gpus(index)


def search(index: faiss.Index, queries: np.ndarray, k: int, block: int = 4096):
    """Top-k over query blocks -> (D [Q, k] float32, I [Q, k] int64); missing hits are -1."""
    k = min(k, index.ntotal)
    D = np.empty((len(queries), k), dtype=np.float32)
    I = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), block):
        q = np.ascontiguousarray(queries[start : start + block], dtype=np.float32)
        D[start : start + len(q)], I[start : start + len(q)] = index.search(q, k)
    return D, I


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], offsets: list[int], k: int):
    """Merge per-shard (D, I) results, I local to the shard starting at ``offsets[s]``, into the
    global top-k by score. Ties break on the lower global id so the merge equals one flat search."""
    D = np.concatenate([d for d, _ in parts], axis=1)
    I = np.concatenate([np.where(i >= 0, i + off, -1) for (_, i), off in zip(parts, offsets)], 1)
    # lexsort: last key is primary -> by score descending, then id ascending; -1 hits last.
    missing = I < 0
    order = np.lexsort((np.where(missing, np.iinfo(np.int64).max, I), -np.where(missing, -np.inf, D)))
    order = order[:, :k]
    return np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)


def save_index(index: faiss.Index, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)


def load_index(path: Path, nprobe: int) -> faiss.Index:
    index = faiss.read_index(str(path))
    set_search_params(index, nprobe)
    return index
