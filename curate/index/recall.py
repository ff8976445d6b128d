"""Recall guard for approximate indexes: measure, record, and fail or raise nprobe below a floor.

An approximate index (IVF, HNSW, PQ) silently loses true neighbours, and an IVF index probing few
lists may return fewer than k hits (padded with id -1): mining then sees a shorter, worse
candidate list and nothing says so. The guard searches a seeded sample of queries both with the
index and by brute force over the doc vectors, and computes

    recall@k = mean_q |{approximate hits of q whose exact score >= the k-th exact score of q}| / k'

with k' = min(k, #docs). Ties at the k-th score count as hits (duplicate docs tie exactly), a -1
hit is a miss and the number of them is reported. Below ``index.recall_floor`` the run fails, or
(``recall_action: raise_nprobe``) nprobe / efSearch is doubled until the floor holds or every
list is probed. Exact (Flat) indexes are not measured.
"""

from __future__ import annotations

import logging

import faiss
import numpy as np

from curate.config import IndexConfig
from curate.errors import CurateError
from curate.index import build as index_mod

log = logging.getLogger(__name__)

TIE_TOL = 1e-5  # float32 scores of the same pair from two code paths differ by ~1e-7
MAX_EF_SEARCH = 1 << 14


class RecallError(CurateError):
    """The approximate index misses too many true neighbours for mining."""


def exact_search(doc_vecs: np.ndarray, queries: np.ndarray, k: int, doc_block: int = 16384):
    """Brute-force top-k by inner product, streamed over doc blocks -> (scores [Q, k] best first,
    ids [Q, k]). Memory is Q x (k + doc_block) scores; ``doc_vecs`` may be a ``files.NpyRows``."""
    k = min(k, len(doc_vecs))
    q = np.ascontiguousarray(queries, dtype=np.float32)
    top_s = np.full((len(q), k), -np.inf, dtype=np.float32)
    top_i = np.full((len(q), k), -1, dtype=np.int64)
    for start in range(0, len(doc_vecs), doc_block):
        block = np.asarray(doc_vecs[start : start + doc_block], dtype=np.float32)
        s = np.concatenate([top_s, q @ block.T], 1)  # [Q, k + b]
        keep = np.argpartition(-s, k - 1, axis=1)[:, :k]  # positions in [0, k + b)
        old_i = np.take_along_axis(top_i, np.minimum(keep, k - 1), 1)
        top_i = np.where(keep < k, old_i, start + keep - k)
        top_s = np.take_along_axis(s, keep, 1)
    order = np.argsort(-top_s, axis=1, kind="stable")
    return np.take_along_axis(top_s, order, 1), np.take_along_axis(top_i, order, 1)


def recall_at_k(
    doc_vecs: np.ndarray,
    queries: np.ndarray,
    hits: np.ndarray,
    exact_D: np.ndarray,
    chunk: int = 64,
) -> tuple[float, int, int]:
    """Tie-aware recall of ``hits`` ([Q, k'] ids, -1 = missing) against the exact top-k scores
    -> (recall, missing hits, queries with fewer than k real hits)."""
    Q, k = exact_D.shape
    good = 0
    missing = k * Q - min(hits.shape[1], k) * Q  # columns the search did not even return
    short = 0
    for s in range(0, Q, chunk):
        h, q = hits[s : s + chunk, :k], np.asarray(queries[s : s + chunk], dtype=np.float32)
        valid = h >= 0
        vecs = np.asarray(doc_vecs[np.where(valid, h, 0).ravel()], dtype=np.float32)
        true = np.einsum("qkd,qd->qk", vecs.reshape(*h.shape, -1), q)  # [c, k] exact scores
        ok = valid & (true >= exact_D[s : s + chunk, -1:] - TIE_TOL)
        good += sum(len(set(r[o].tolist())) for r, o in zip(h, ok, strict=True))  # once per doc
        missing += int((~valid).sum())
        short += int((valid.sum(1) < k).sum())
    return good / (k * Q), missing, short


def is_exact(index: faiss.Index) -> bool:
    """Flat (brute-force) indexes, also under an id map, are exact."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIDMap):
        index = faiss.downcast_index(index.index)
    return isinstance(index, faiss.IndexFlat)


def max_probe(index: faiss.Index) -> int:
    """The nprobe past which raising it changes nothing: every IVF list, an efSearch cap for
    HNSW, 0 for other indexes (nprobe does not apply)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return int(ivf.nlist)
    return MAX_EF_SEARCH if hasattr(faiss.downcast_index(index), "hnsw") else 0


def _effective(index: faiss.Index, nprobe: int) -> int:
    """HNSW searches with max(efSearch, nprobe) (``index.set_search_params``): report that."""
    hnsw = getattr(faiss.downcast_index(index), "hnsw", None)
    return max(nprobe, int(hnsw.efSearch)) if hnsw is not None else nprobe


def sample_rows(count: int, n: int, seed: int) -> np.ndarray:
    """The seeded sample of ``n`` of ``count`` rows the guard checks (all when fewer), sorted."""
    if count <= n:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, n, replace=False))


def sample_queries(queries: np.ndarray, n: int, seed: int) -> np.ndarray:
    return np.asarray(queries[sample_rows(len(queries), n, seed)], dtype=np.float32)


def guard(
    index: faiss.Index,
    doc_vecs: np.ndarray,
    queries: np.ndarray,
    k: int,
    cfg: IndexConfig,
    seed: int,
) -> tuple[int, dict]:
    """Check ``index`` on a sample of ``queries`` -> (nprobe to mine with, manifest record).

    Raises RecallError below ``cfg.recall_floor`` unless raising nprobe (by config) lifts it."""
    rec = {"exact": is_exact(index), "k": min(k, index.ntotal), "floor": cfg.recall_floor,
           "action": cfg.recall_action, "nprobe": cfg.nprobe}  # fmt: skip
    if rec["exact"]:
        log.info("index is exact (flat): recall guard not needed")
        return cfg.nprobe, rec
    sample = sample_queries(queries, cfg.recall_sample, seed)
    exact_D, _ = exact_search(doc_vecs, sample, k)
    rec.update(sample=len(sample), attempts=[])
    nprobe = cfg.nprobe
    while True:
        index_mod.set_search_params(index, nprobe)
        nprobe = _effective(index, nprobe)
        _, hits = index_mod.search(index, sample, k, cfg.query_block)
        recall, missing, short = recall_at_k(doc_vecs, sample, hits, exact_D)
        attempt = {"nprobe": nprobe, "recall": round(recall, 5), "missing_hits": missing,
                   "short_queries": short}  # fmt: skip
        rec["attempts"].append(attempt)
        log.info("recall@%d on %d queries at nprobe %d: %.4f (%d missing hits)",
                 rec["k"], len(sample), nprobe, recall, missing)  # fmt: skip
        if recall >= cfg.recall_floor:
            rec.update(attempt)
            return nprobe, rec
        if cfg.recall_action == "fail" or nprobe >= max_probe(index):
            raise RecallError(_failure(rec, attempt, max_probe(index)))
        nprobe = min(2 * nprobe, max_probe(index))


def _failure(rec: dict, attempt: dict, top: int) -> str:
    fix = (
        f"set index.recall_action=raise_nprobe or a larger index.nprobe (up to {top})"
        if rec["action"] == "fail" and attempt["nprobe"] < top
        else "use an exact index (index.factory=Flat), finer codes or a Refine(Flat) stage"
    )
    return (
        f"index recall@{rec['k']} is {attempt['recall']:.4f} at nprobe {attempt['nprobe']} "
        f"({attempt['missing_hits']} missing hits), below index.recall_floor={rec['floor']}: "
        f"mining would silently lose true neighbours. Fix: {fix}, or lower index.recall_floor"
    )


def guard_work_dir(
    work, queries: np.ndarray, k: int, cfg: IndexConfig, seed: int
) -> tuple[int, dict]:
    """``guard`` on the index and doc vectors that ``build_index_files`` wrote to ``work``."""
    from curate.files import NpyRows

    index = index_mod.load_index(work / "index.faiss", cfg.nprobe)
    # Read, not mapped: the brute force touches every row, and a map's pages would all stay in
    # the task's RSS (15 GB at 10M docs), which the nanny counts.
    return guard(index, NpyRows(work / "doc_vecs.npy"), queries, k, cfg, seed)
