"""Deduplication: documents with the same normalised text (exact) or embeddings above a cosine
threshold (semantic, SemDeDup-style) become one canonical id everywhere."""

from __future__ import annotations

import faiss
import numpy as np
import polars as pl

from curate.text import text_hash

_HASH_CHUNK = 100_000  # texts turned into Python strings at a time


def add_text_hash(corpus: pl.DataFrame) -> pl.DataFrame:
    """Adds ``hash``: the first 64 bits of the text hash of title + text, normalised, so
    case/punctuation variants collide. A u64 column computed chunk by chunk: a list of every
    joined text and hex digest would be ~260 B a document in the driver."""
    out = np.empty(corpus.height, np.uint64)
    for s in range(0, corpus.height, _HASH_CHUNK):
        part = corpus.slice(s, _HASH_CHUNK)
        chunk = (part["title"] + " " + part["text"]).to_list()
        out[s : s + len(chunk)] = [int(text_hash(t)[:16], 16) for t in chunk]
    return corpus.with_columns(pl.Series("hash", out, pl.UInt64))


def repeated_rows(hashes: np.ndarray) -> np.ndarray:
    """Rows whose hash another row shares, ascending. One sorted copy of the hashes (80 MB at
    10M docs) where a hash table over them (``is_duplicated``) took ~8x that in the driver."""
    ordered = np.sort(hashes)
    dup = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    del ordered
    return np.flatnonzero(np.isin(hashes, dup)) if len(dup) else np.zeros(0, np.int64)


def canonical_ids(corpus: pl.DataFrame) -> pl.DataFrame:
    """doc_id -> canonical_id, the smallest doc_id sharing its text hash (order-independent).

    ``corpus`` must carry ``hash`` (see ``add_text_hash``)."""
    return corpus.select(
        "doc_id", pl.col("doc_id").min().over("hash").alias("canonical_id")
    ).sort("doc_id")


def semantic_duplicates(
    doc_ids: list[str], vecs: np.ndarray, threshold: float, n_clusters: int = 0, seed: int = 0
) -> list[tuple[str, str, float]]:
    """SemDeDup (Abbas et al. 2023): k-means the unit vectors, then within each cluster link pairs
    whose cosine exceeds ``threshold``. -> (doc_id, canonical_id, cosine) for every merged doc;
    the canonical id of a linked group is its smallest id.

    Comparing only within a cluster keeps the cost near N x cluster size instead of N^2."""
    n = len(doc_ids)
    k = n_clusters or max(1, round(n / 1000))
    if k > 1:
        km = faiss.Kmeans(vecs.shape[1], k, niter=20, seed=seed, spherical=True, verbose=False)
        km.cp.min_points_per_centroid = 1
        x = np.ascontiguousarray(vecs, dtype=np.float32)
        km.train(x)
        labels = km.index.search(x, 1)[1][:, 0]
    else:
        labels = np.zeros(n, dtype=np.int64)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    best: dict[int, float] = {}
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        sims = vecs[members] @ vecs[members].T  # [m, m]
        for a, b in zip(*np.nonzero(np.triu(sims > threshold, k=1))):
            i, j = int(members[a]), int(members[b])
            parent[find(i)] = find(j)
            best[i] = max(best.get(i, -1.0), float(sims[a, b]))
            best[j] = max(best.get(j, -1.0), float(sims[a, b]))
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    merged = []
    for members in groups.values():
        if len(members) < 2:
            continue
        canon = min(doc_ids[i] for i in members)
        merged += [(doc_ids[i], canon, round(best[i], 4)) for i in members if doc_ids[i] != canon]
    return sorted(merged)
