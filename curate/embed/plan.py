"""The embedding plan: which texts share a batch, and which batches share a partition (a task).

A text's vector depends, in its last bits, on the batch it is computed in: the padded length,
the row count and its row decide the float reduction order of the matmuls. So batches are cut
once over all texts of a kind, from their token lengths and contents alone, and partitions only
group whole batches: ``embed.partition_size`` changes how the work is split, never a vector.

Cuts are content-defined (as rsync's chunks are), so an edited, added or removed text moves only
the batches and partitions near it and the content-addressed cache keeps the others:

- texts run longest first, ties by content hash, then by input position;
- a batch ends where one more row would exceed the token budget (rows x longest row), or before
  an anchor text: one whose hash is 0 modulo 4x its own batch capacity;
- a partition ends where the next batch would take it past ``partition_size`` texts, or before a
  batch that holds a partition anchor (other hash bits, 0 modulo 4x partition_size).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

ANCHOR_SPACING = 4  # anchors every ~4 full batches (partitions): ~10% below greedy fill


@dataclass(frozen=True)
class Partition:
    rows: np.ndarray  # [n] input positions, in the order they are embedded
    sizes: list[int]  # consecutive batch sizes over ``rows``


def text_hashes(texts: list[str], prefix: str = "") -> np.ndarray:
    """[N] uint64 content hash of each text as it is embedded (prefix included)."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b((prefix + t).encode("utf-8"), digest_size=8).digest(),
                        "little") for t in texts),
        dtype=np.uint64, count=len(texts),
    )  # fmt: skip


def _capacity(lengths: np.ndarray, budget: int) -> np.ndarray:
    """Rows of a batch whose longest row has each length (at least one)."""
    return np.maximum(1, budget // np.maximum(lengths, 1))


def batch_bounds(lengths: np.ndarray, hashes: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """[start, stop) of each batch over texts already in plan order (longest first)."""
    cap = _capacity(lengths, budget)
    anchors = np.flatnonzero(hashes % (ANCHOR_SPACING * cap).astype(np.uint64) == 0)
    bounds, start, n = [], 0, len(lengths)
    while start < n:
        stop = min(start + int(cap[start]), n)
        nxt = np.searchsorted(anchors, start, side="right")  # first anchor after the start
        if nxt < len(anchors) and anchors[nxt] < stop:
            stop = int(anchors[nxt])
        bounds.append((start, stop))
        start = stop
    return bounds


def plan(
    lengths: np.ndarray, hashes: np.ndarray, budget: int, partition_size: int
) -> list[Partition]:
    """Partitions of whole batches over texts with token ``lengths`` and content ``hashes``."""
    lengths, hashes = np.asarray(lengths, dtype=np.int64), np.asarray(hashes, dtype=np.uint64)
    order = np.lexsort((np.arange(len(lengths)), hashes, -lengths))  # last key is primary
    hashes = hashes[order]
    hit = (hashes >> np.uint64(32)) % np.uint64(ANCHOR_SPACING * partition_size) == 0
    hits = np.concatenate([[0], np.cumsum(hit)])
    parts: list[list[tuple[int, int]]] = []
    count = 0
    for start, stop in batch_bounds(lengths[order], hashes, budget):
        anchored = hits[stop] > hits[start]
        if not parts or (count and (count + stop - start > partition_size or anchored)):
            parts.append([])
            count = 0
        parts[-1].append((start, stop))
        count += stop - start
    return [
        Partition(order[group[0][0] : group[-1][1]], [b - a for a, b in group]) for group in parts
    ]
