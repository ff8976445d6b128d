"""Topic clusters of queries: faiss k-means over query embeddings, seeded."""

from __future__ import annotations

import logging
import math

import faiss
import numpy as np

log = logging.getLogger(__name__)


def n_topics_for(n_queries: int, requested: int, batch_size: int) -> int:
    """``requested`` if set; else ~sqrt(N), but never so many that a topic can't fill a batch."""
    if requested:
        return max(1, min(requested, n_queries))
    return max(1, min(round(math.sqrt(n_queries)), n_queries // max(batch_size, 1)))


def cluster(vecs: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Topic label per row ([N] int32); k-means on unit vectors with inner product."""
    if k <= 1 or len(vecs) <= k:
        return np.zeros(len(vecs), dtype=np.int32)
    x = np.ascontiguousarray(vecs, dtype=np.float32)
    km = faiss.Kmeans(x.shape[1], k, niter=25, seed=seed, spherical=True, verbose=False)
    km.cp.min_points_per_centroid = 1  # small topic sets are expected, not a warning
    km.train(x)
    _, labels = km.index.search(x, 1)
    sizes = np.bincount(labels[:, 0], minlength=k)
    log.info(
        "%d topics, sizes min %d / median %d / max %d",
        k,
        sizes.min(),
        np.median(sizes),
        sizes.max(),
    )
    return labels[:, 0].astype(np.int32)
