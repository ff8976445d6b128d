"""Stage 3: FAISS indexes over unit vectors (inner product = cosine) and streamed top-k search.

Flat (exact) by default; any ``index_factory`` string otherwise, trained on a seeded sample.
Queries are searched in blocks so memory is bounded by block x k, never queries x docs.
Sharded search keeps each shard's top-k and merges them to the exact global top-k.

``factory: torch-exact`` builds the same flat files (so the record, the recall guard and the
shards are unchanged) and searches their vectors with ``curate.index.exact`` in torch: on CUDA when
torch sees it, no k cap. A faiss GPU index asked for more than ``GPU_MAX_K`` neighbours searches
on the CPU instead (``gpu_for_k``), and says so.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import faiss
import numpy as np

from curate.config import IndexConfig
from curate.errors import ConfigError, StageMismatchError
from curate.files import atomic_path, atomic_write_bytes

log = logging.getLogger(__name__)


TORCH_EXACT = "torch-exact"  # index.factory: flat files, searched in torch (curate.index.exact)


def choose_factory(n: int, dim: int, cfg: IndexConfig) -> str:
    """Flat below ``flat_max`` vectors; IVF with ~4 sqrt(N) lists and PQ codes above, re-ranked
    with ``cfg.refine`` codes. torch-exact stores flat files."""
    if cfg.factory == TORCH_EXACT:
        return "Flat"
    if cfg.factory != "auto":
        return cfg.factory
    if n <= cfg.flat_max:
        return "Flat"
    nlist = 1 << max(10, round(math.log2(4 * math.sqrt(n))))
    # Preferred sub-vector counts, then the largest divisor <= 96 (1024, 1536, 4096 dims need it).
    prefer = (dim // 4, dim // 8, dim // 2, dim, *range(96, 0, -1))
    m = next(m for m in prefer if m and dim % m == 0 and m <= 96)
    refine = f",Refine({cfg.refine})" if cfg.refine else ""
    return f"IVF{nlist},PQ{m}x8{refine}"


def use_gpu(pref: str) -> bool:
    n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if pref == "always" and n == 0:
        raise ConfigError("index.use_gpu: 'always' but faiss sees no GPU; install curate[gpu]")
    on = pref != "never" and n > 0
    log.info("faiss device: %s", f"{n} GPU(s)" if on else "CPU")
    return on


def build_index(vectors: np.ndarray, cfg: IndexConfig, seed: int = 0) -> faiss.Index:
    """Index ``vectors`` ([N, D] float32, unit norm) with inner-product metric."""
    index = trained_index(vectors, cfg, seed)
    add_in_chunks(index, vectors)
    set_search_params(index, cfg.nprobe)
    log.info(
        "built %s index over %d vectors of dim %d",
        choose_factory(*vectors.shape, cfg),
        *vectors.shape,
    )
    return index


def trained_index(vectors: np.ndarray, cfg: IndexConfig, seed: int = 0) -> faiss.Index:
    """An empty index for all of ``vectors`` ([N, D], may be a memory map), trained on a seeded
    sample of at most ``cfg.train_sample`` rows. Shards copy it, so they share one quantizer."""
    n, dim = vectors.shape
    factory = choose_factory(n, dim, cfg)
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise ConfigError(f"index.factory: faiss rejects {factory!r}: {err}") from err
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and hasattr(faiss.downcast_index(ivf), "do_polysemous_training"):
        # index_factory turns polysemous training on for IVF-PQ ("PQ96x8" without "np"): an
        # annealing over each sub-quantizer's codes, 80% of IVF256,PQ96x8 training time on 20k
        # vectors (docs/benchmarks.md), for a polysemous filter curate never searches with.
        faiss.downcast_index(ivf).do_polysemous_training = False
    if isinstance(faiss.downcast_index(index), faiss.IndexRefine):
        faiss.downcast_index(index).k_factor = cfg.k_factor  # saved with the index
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        take = min(n, cfg.train_sample)
        rows = np.sort(rng.choice(n, take, replace=False)) if take < n else slice(None)
        try:
            index.train(np.ascontiguousarray(vectors[rows], dtype=np.float32))
        except RuntimeError as err:
            raise ConfigError(
                f"index: faiss cannot train {factory!r} on {take} vectors: "
                f"{str(err).splitlines()[0]}; give index.factory with fewer IVF lists, raise "
                "index.train_sample, or use index.factory=Flat"
            ) from err
    return index


def add_in_chunks(index: faiss.Index, vectors: np.ndarray, chunk: int = 1 << 16) -> None:
    """Add rows in chunks, so a memory-mapped matrix is never copied whole into memory."""
    for start in range(0, len(vectors), chunk):
        index.add(np.ascontiguousarray(vectors[start : start + chunk], dtype=np.float32))


def shard_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous (start, stop) row ranges of near-equal size; shard s holds global ids
    [start, stop). More shards than rows gives empty ranges, which are dropped."""
    edges = [n * s // shards for s in range(shards + 1)]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def set_search_params(index: faiss.Index, nprobe: int) -> None:
    """nprobe on IVF indexes, efSearch (at least ``nprobe``) on HNSW; into every shard of an
    IndexShards."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexShards):
        for s in range(index.count()):
            set_search_params(index.at(s), nprobe)
        return
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = nprobe
    hnsw = getattr(index, "hnsw", None)
    if hnsw is not None:
        hnsw.efSearch = max(hnsw.efSearch, nprobe)


def join_shards(shards: list[faiss.Index]) -> faiss.Index:
    """One faiss index over shards searched in turn, ids successive (shard s starts where s-1
    ends); for whole-index checks such as the recall guard."""
    joined = faiss.IndexShards(shards[0].d, False, True)
    for shard in shards:
        joined.add_shard(shard)
    return joined


_GPU_RESOURCES: list = []  # kept for the life of the process: GPU indexes point into them
GPU_MAX_K = 2048  # faiss GPU search returns at most this many neighbours per query


def to_gpu(index: faiss.Index, nprobe: int, device: int = 0) -> faiss.Index:
    """A copy of ``index`` on one GPU; ``device`` counts the GPUs this process sees (a dask-cuda
    worker sees its own GPU as device 0). float16 lookup tables: GPU IVF-PQ needs them for
    codes over 56 bytes (PQ96x8 is 96)."""
    if not _GPU_RESOURCES:
        _GPU_RESOURCES.append(faiss.StandardGpuResources())
    opts = faiss.GpuClonerOptions()
    opts.useFloat16 = True
    refine = faiss.downcast_index(index)
    if isinstance(refine, faiss.IndexRefine):  # GPU has no IndexRefine: the IVF-PQ goes to the
        # GPU, the re-ranking codes stay on the CPU (they are read for k_factor x k rows only)
        base = faiss.index_cpu_to_gpu(_GPU_RESOURCES[0], device, refine.base_index, opts)
        faiss.GpuParameterSpace().set_index_parameter(base, "nprobe", nprobe)
        gpu = faiss.IndexRefine(base, refine.refine_index)
        gpu.k_factor = refine.k_factor
        gpu.referenced_objects = [base, refine]  # the wrapper does not own them
        log.info("index moved to GPU %d (re-ranking on CPU)", device)
        return gpu
    gpu = faiss.index_cpu_to_gpu(_GPU_RESOURCES[0], device, index, opts)
    if faiss.try_extract_index_ivf(index) is not None:
        faiss.GpuParameterSpace().set_index_parameter(gpu, "nprobe", nprobe)
    log.info("index moved to GPU %d", device)
    return gpu


def gpu_for_k(gpu: bool, k: int, where: str = "") -> bool:
    """Whether a faiss search of k neighbours may run on the GPU: above faiss-GPU's cap of
    ``GPU_MAX_K`` it falls back to the CPU copy of the index (exact for flat, the same lists and
    codes for IVF), logged; index.factory=torch-exact has no cap on the GPU."""
    if gpu and k > GPU_MAX_K:
        log.warning("k=%d is above faiss-GPU's %d: searching %s on the CPU (index.factory="
                    "torch-exact searches flat vectors on the GPU at any k)", k, GPU_MAX_K,
                    where or "the index")  # fmt: skip
        return False
    return gpu


def flat_vectors(index: faiss.Index) -> np.ndarray:
    """The [N, D] float32 vectors a flat index holds (a view of its storage, no copy)."""
    flat = faiss.downcast_index(index)
    if not isinstance(flat, faiss.IndexFlat):
        raise ConfigError(
            f"index.factory={TORCH_EXACT} searches flat vectors, got {type(flat).__name__}"
        )
    return faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)


def torch_exact(index: faiss.Index, pref: str):
    """A ``curate.exact.ExactSearch`` over a flat index's vectors, on CUDA unless ``pref`` is
    never (index.use_gpu) or torch sees no GPU."""
    from curate.index.exact import ExactSearch, exact_device

    return ExactSearch(flat_vectors(index), exact_device(pref), owner=index)


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
    order = np.lexsort(
        (np.where(missing, np.iinfo(np.int64).max, I), -np.where(missing, -np.inf, D))
    )
    order = order[:, :k]
    return np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)


def save_index(index: faiss.Index, path: Path) -> None:
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def load_index(path: Path, nprobe: int) -> faiss.Index:
    index = faiss.read_index(str(path))
    set_search_params(index, nprobe)
    return index


# --- what an index was built from: checked before queries are searched in it ---------------

RECORD = "index.json"  # beside the index files in the work folder


def write_record(work: Path, model: str, model_fp: str, dim: int, docs: int) -> None:
    """Record the model (name and content fingerprint) and the vectors an index was built from."""
    rec = {"model": model, "model_fingerprint": model_fp, "dim": dim, "docs": docs}
    atomic_write_bytes(work / RECORD, json.dumps(rec, sort_keys=True).encode())


def check_record(work: Path, model: str, model_fp: str, dim: int, docs: int) -> None:
    """Raise StageMismatchError unless the index in ``work`` was built by the same model, at the
    same dimension, over the same number of docs as the query vectors about to search it."""
    path = work / RECORD
    if not path.is_file():
        raise StageMismatchError(
            f"{path}: missing, so the index in {work} cannot be matched to model {model}. "
            f"Fix: delete {work} and rerun to rebuild the index"
        )
    rec = json.loads(path.read_text())
    got = {"model_fingerprint": model_fp, "dim": dim, "docs": docs}
    if diff := [k for k in got if rec.get(k) != got[k]]:
        theirs = ", ".join(f"{k} {rec.get(k)}" for k in diff)
        ours = ", ".join(f"{k} {got[k]}" for k in diff)
        raise StageMismatchError(
            f"the index in {work} was built from embeddings of model {rec.get('model')!r} "
            f"({theirs}) but the queries are embedded with model {model!r} ({ours}). Fix: delete "
            f"{work} and "
            "rerun, so the index is rebuilt with embed.model"
        )


def check_query_dim(index: faiss.Index, queries: np.ndarray, path: str) -> None:
    """The index file itself against the query vectors, where a search task loads it."""
    if index.d != queries.shape[1]:
        raise StageMismatchError(
            f"{path} holds {index.d}-dim vectors but the queries are {queries.shape[1]}-dim "
            "(embedded with another model). Fix: delete the work folder and rerun"
        )
