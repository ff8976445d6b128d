"""Stage 5: compose training batches from topic clusters, free of in-batch collisions.

``batch.topics`` says what a batch does with topics (query clusters):

- ``spread`` (default): topics are mixed evenly and a batch holds at most ``topic_cap`` rows of one
  topic. Queries of one topic share unlabelled relevant documents; packed into one batch, those
  become each other's in-batch negatives (false negatives). Rows come in a stratified order (each
  topic's rows spaced evenly through the whole order) so every topic is used up at the same pace.
- ``cluster``: each batch takes ``same_topic`` x B rows from one topic (harder in-batch negatives,
  TAS-Balanced style; topics drawn with probability proportional to their remaining rows) and fills
  the rest from a seeded global order.
- ``off``: a seeded global order, topics ignored.

``max_rows_per_query`` caps the rows (positives) of one query in a batch. Within a batch:

- no document appears twice (as positive or negative): a row whose positive is already in the
  batch waits for a later batch; a row's negative already in the batch is skipped for that row
  (its column is still in the batch, so the query still sees it in the denominator) and the
  row's next spare negative takes its place (``Row.negs`` is in preference order);
- a row whose known positives collide with another row's documents is either kept apart
  (``shared_positives: separate``) or allowed in, with the collision left to the trainer's mask
  via ``known_pos_ids`` (``mask``) — never both, never silently.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np

from curate.config import BatchConfig

# How far down a queue the composer looks for a row that fits before giving up on it.
SCAN_LIMIT = 256


@dataclass(frozen=True)
class Row:
    pos: str
    negs: tuple[str, ...]
    known: frozenset[str]
    topic: int
    query: str = ""


@dataclass(frozen=True)
class Caps:
    """Most rows of one topic / one query in a batch (None: no cap)."""

    topic: int | None = None
    query: int | None = None


@dataclass
class _Batch:
    rows: list[int] = field(default_factory=list)
    negs: dict[int, tuple[str, ...]] = field(default_factory=dict)
    docs: set[str] = field(default_factory=set)
    known: set[str] = field(default_factory=set)
    topics: Counter = field(default_factory=Counter)
    queries: Counter = field(default_factory=Counter)


def _fits(row: Row, batch: _Batch, separate: bool, caps: Caps = Caps()) -> bool:
    if row.pos in batch.docs:
        return False
    if caps.topic is not None and batch.topics[row.topic] >= caps.topic:
        return False
    if caps.query is not None and batch.queries[row.query] >= caps.query:
        return False
    if separate:
        docs = {row.pos, *row.negs}
        return not (row.known & batch.docs or docs & batch.known)
    return True


def _add(batch: _Batch, i: int, row: Row, stats: Counter, want: int | None) -> None:
    """Place row ``i`` with its first ``want`` negatives (None: all) not already in the batch."""
    take = []  # positions in row.negs, in preference order
    for j, n in enumerate(row.negs):
        if len(take) == want:
            break
        if n in batch.docs:
            stats["neg_dropped_in_batch"] += 1
        else:
            take.append(j)
    if want is not None:
        stats["neg_spares_used"] += sum(j >= want for j in take)
        stats["rows_short_of_negatives"] += len(take) < min(want, len(row.negs))
    negs = tuple(row.negs[j] for j in take)
    batch.rows.append(i)
    batch.negs[i] = negs
    batch.docs.update((row.pos, *negs))
    batch.known.update(row.known)
    batch.topics[row.topic] += 1
    batch.queries[row.query] += 1


def _take(queue: deque, rows: list[Row], placed, batch: _Batch, n: int, cfg, stats, want,
          caps: Caps = Caps()) -> int:
    """Move up to ``n`` fitting rows from the front of ``queue`` into ``batch`` -> rows moved."""
    scanned, kept, moved = 0, deque(), 0
    while queue and n > 0 and scanned < SCAN_LIMIT:
        i = queue.popleft()
        if placed[i]:
            continue
        scanned += 1
        if _fits(rows[i], batch, cfg.shared_positives == "separate", caps):
            _add(batch, i, rows[i], stats, want)
            placed[i] = True
            n -= 1
            moved += 1
        else:
            kept.append(i)
    queue.extendleft(reversed(kept))
    return moved


def compose(
    rows: list[Row], cfg: BatchConfig, seed: int, want: int | None = None
) -> tuple[list[list[int]], dict, Counter]:
    """-> (batches as row numbers, row number -> negatives kept in its batch, statistics); each
    row keeps its first ``want`` negatives (None: all) that are not already in its batch."""
    rng = np.random.default_rng(seed)
    if cfg.topics == "spread":
        out, negs, stats = _spread(rows, cfg, rng, want)
    else:
        out, negs, stats = _clustered(rows, cfg, rng, want)
    if cfg.drop_last:
        stats["rows_dropped_last"] = sum(len(b) for b in out if len(b) < cfg.batch_size)
        out = [b for b in out if len(b) == cfg.batch_size]
    stats["batches"] = len(out)
    stats["full_batches"] = sum(len(b) == cfg.batch_size for b in out)
    stats["masked_pairs"] = sum(_collisions(rows, b, negs) for b in out)
    return out, negs, stats


def topic_cap(cfg: BatchConfig, n_topics: int) -> int:
    """``batch.topic_cap``, or (0) as few rows of one topic per batch as the topics allow."""
    return cfg.topic_cap or -(-cfg.batch_size // max(n_topics, 1))


def _members(rows: list[Row]) -> dict[int, list[int]]:
    """Topic -> its row numbers in row order, topics in sorted order (one pass over the rows)."""
    out: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        out.setdefault(r.topic, []).append(i)
    return dict(sorted(out.items()))


def _stratified(rows: list[Row], rng: np.random.Generator) -> list[int]:
    """Every topic's rows (shuffled) spaced evenly through one order: row k of a topic of n
    rows sits at (k + offset) / n, the offset drawn per topic, so topics interleave at the pace
    of their sizes."""
    keys = np.empty(len(rows))
    for members in _members(rows).values():
        members = rng.permutation(members)
        keys[members] = (np.arange(len(members)) + rng.random()) / len(members)
    return np.lexsort((np.arange(len(rows)), keys)).tolist()


def _spread(rows: list[Row], cfg: BatchConfig, rng, want):
    """Batches in stratified order under the topic and query caps; the caps are lifted only
    for a batch they would leave short (the last topics left), and the rows so placed counted."""
    caps = Caps(topic_cap(cfg, len({r.topic for r in rows})), cfg.max_rows_per_query or None)
    pool = deque(_stratified(rows, rng))
    placed = np.zeros(len(rows), dtype=bool)
    out, negs, stats = [], {}, Counter()
    while not placed.all():
        batch = _Batch()
        _take(pool, rows, placed, batch, cfg.batch_size, cfg, stats, want, caps)
        short = cfg.batch_size - len(batch.rows)
        if short and pool:  # only rows of topics already in the batch are left nearby
            relaxed = Caps(query=caps.query)
            stats["rows_over_topic_cap"] += _take(
                pool, rows, placed, batch, short, cfg, stats, want, relaxed
            )
        _close(batch, rows, placed, stats, want, out, negs)
    return out, negs, stats


def _close(batch: _Batch, rows, placed, stats, want, out: list, negs: dict) -> None:
    """Append ``batch``; one that nothing fit (within the scan limit) takes any row."""
    if not batch.rows:
        i = int(np.flatnonzero(~placed)[0])
        _add(batch, i, rows[i], stats, want)
        placed[i] = True
    out.append(batch.rows)
    negs.update(batch.negs)


def _clustered(rows: list[Row], cfg: BatchConfig, rng, want):
    """``cluster``: same_topic x B rows of one topic, the rest from a global order; ``off`` is
    the same with no rows drawn by topic. The per-query cap applies to both."""
    caps = Caps(query=cfg.max_rows_per_query or None)
    members = _members(rows)
    topics = list(members)
    queues = {t: deque(int(i) for i in rng.permutation(members[t])) for t in topics}
    left = np.array([len(members[t]) for t in topics], dtype=np.float64)
    slot = {t: k for k, t in enumerate(topics)}
    pool = deque(int(i) for i in rng.permutation(len(rows)))
    placed = np.zeros(len(rows), dtype=bool)
    n_same = round(cfg.batch_size * cfg.same_topic) if cfg.topics == "cluster" else 0
    out, negs, stats = [], {}, Counter()
    while not placed.all():
        t = topics[int(rng.choice(len(topics), p=left / left.sum()))]
        batch = _Batch()
        _take(queues[t], rows, placed, batch, n_same, cfg, stats, want, caps)
        _take(pool, rows, placed, batch, cfg.batch_size - len(batch.rows), cfg, stats, want, caps)
        _close(batch, rows, placed, stats, want, out, negs)
        for i in batch.rows:
            left[slot[rows[i].topic]] -= 1
    return out, negs, stats


def _collisions(rows: list[Row], batch: list[int], negs: dict) -> int:
    """(row, other row's document) pairs in a batch where the document is a known positive of
    the row: the entries the trainer's mask removes."""
    n = 0
    for i in batch:
        for j in batch:
            if i != j:
                n += len(rows[i].known & {rows[j].pos, *negs[j]})
    return n
