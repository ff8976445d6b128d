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
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from curate.config import BatchConfig

# How far down a queue the composer looks for a row that fits before giving up on it.
SCAN_LIMIT = 256


@dataclass(frozen=True)
class Row:
    pos: Hashable  # a doc id, or (RowTable) a doc's number
    negs: tuple
    known: frozenset
    topic: int
    query: Hashable = ""


@dataclass(frozen=True)
class RowTable(Sequence):
    """The rows as integer columns (doc and query numbers): a ``Row`` per row would be several
    Python objects each, a few GB at a million rows. ``table[i]`` builds row i's ``Row``."""

    pos: np.ndarray  # [R] the positive's doc number
    neg_offsets: np.ndarray  # [R + 1]: row i's negatives are negs[neg_offsets[i]:neg_offsets[i+1]]
    negs: np.ndarray  # doc numbers, in each row's preference order
    topic: np.ndarray  # [R]
    query: np.ndarray  # [R] the query's number
    known_offsets: np.ndarray  # [Q + 1]: query q's known positives, as neg_offsets
    known: np.ndarray  # doc numbers

    def __len__(self) -> int:
        return len(self.pos)

    def __getitem__(self, i: int) -> Row:
        q = int(self.query[i])
        known = self.known[self.known_offsets[q] : self.known_offsets[q + 1]]
        negs = self.negs[self.neg_offsets[i] : self.neg_offsets[i + 1]]
        return Row(int(self.pos[i]), tuple(negs.tolist()), frozenset(known.tolist()),
                   int(self.topic[i]), q)  # fmt: skip


class Kept(Mapping):
    """Row number -> the negatives it keeps in its batch (of ``Row.negs``, in order), held as
    one flag per (row, negative) rather than a tuple per row."""

    def __init__(self, rows: Sequence[Row]):
        self.rows = rows
        self.offsets = (rows.neg_offsets if isinstance(rows, RowTable)
                        else np.cumsum([0, *(len(r.negs) for r in rows)]))  # fmt: skip
        self.mask = np.zeros(int(self.offsets[-1]), dtype=bool)

    def keep(self, i: int, positions: list[int]) -> None:
        self.mask[self.offsets[i] + np.asarray(positions, dtype=np.int64)] = True

    def positions(self, i: int) -> np.ndarray:
        return np.flatnonzero(self.mask[self.offsets[i] : self.offsets[i + 1]])

    def __getitem__(self, i: int) -> tuple:
        negs = self.rows[i].negs
        return tuple(negs[j] for j in self.positions(i))

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self.rows)))


def topics_of(rows: Sequence[Row]) -> np.ndarray:
    """[R] each row's topic."""
    if isinstance(rows, RowTable):
        return rows.topic
    return np.fromiter((r.topic for r in rows), dtype=np.int64, count=len(rows))


@dataclass(frozen=True)
class Caps:
    """Most rows of one topic / one query in a batch (None: no cap)."""

    topic: int | None = None
    query: int | None = None


@dataclass
class _Batch:
    rows: list[int] = field(default_factory=list)
    docs: set = field(default_factory=set)
    known: set = field(default_factory=set)
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


def _add(batch: _Batch, i: int, row: Row, stats: Counter, want: int | None, kept: Kept) -> None:
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
    kept.keep(i, take)
    batch.docs.update((row.pos, *negs))
    batch.known.update(row.known)
    batch.topics[row.topic] += 1
    batch.queries[row.query] += 1


def _take(queue: deque, rows: Sequence[Row], placed, batch: _Batch, n: int, cfg, stats, want,
          kept: Kept, caps: Caps = Caps()) -> int:
    """Move up to ``n`` fitting rows from the front of ``queue`` into ``batch`` -> rows moved."""
    scanned, waiting, moved = 0, deque(), 0
    while queue and n > 0 and scanned < SCAN_LIMIT:
        i = queue.popleft()
        if placed[i]:
            continue
        scanned += 1
        row = rows[i]
        if _fits(row, batch, cfg.shared_positives == "separate", caps):
            _add(batch, i, row, stats, want, kept)
            placed[i] = True
            n -= 1
            moved += 1
        else:
            waiting.append(i)
    queue.extendleft(reversed(waiting))
    return moved


def compose(
    rows: Sequence[Row], cfg: BatchConfig, seed: int, want: int | None = None
) -> tuple[list[list[int]], Kept, Counter]:
    """-> (batches as row numbers, row number -> negatives kept in its batch, statistics); each
    row keeps its first ``want`` negatives (None: all) that are not already in its batch.
    ``rows``: a list of ``Row`` or a ``RowTable``."""
    rng = np.random.default_rng(seed)
    negs = Kept(rows)
    if cfg.topics == "spread":
        out, stats = _spread(rows, cfg, rng, want, negs)
    else:
        out, stats = _clustered(rows, cfg, rng, want, negs)
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


def _members(rows: Sequence[Row]) -> dict[int, np.ndarray]:
    """Topic -> its row numbers in row order, topics in sorted order."""
    topic = topics_of(rows)
    order = np.argsort(topic, kind="stable")
    keys, starts = np.unique(topic[order], return_index=True)
    return {int(t): m for t, m in zip(keys, np.split(order, starts[1:]))}


def _stratified(rows: Sequence[Row], rng: np.random.Generator) -> list[int]:
    """Every topic's rows (shuffled) spaced evenly through one order: row k of a topic of n
    rows sits at (k + offset) / n, the offset drawn per topic, so topics interleave at the pace
    of their sizes."""
    keys = np.empty(len(rows))
    for members in _members(rows).values():
        members = rng.permutation(members)
        keys[members] = (np.arange(len(members)) + rng.random()) / len(members)
    return np.lexsort((np.arange(len(rows)), keys)).tolist()


def _spread(rows: Sequence[Row], cfg: BatchConfig, rng, want, negs: Kept):
    """Batches in stratified order under the topic and query caps; the caps are lifted only
    for a batch they would leave short (the last topics left), and the rows so placed counted."""
    n_topics = len(np.unique(topics_of(rows)))
    caps = Caps(topic_cap(cfg, n_topics), cfg.max_rows_per_query or None)
    pool = deque(_stratified(rows, rng))
    placed = np.zeros(len(rows), dtype=bool)
    out, stats = [], Counter()
    while not placed.all():
        batch = _Batch()
        _take(pool, rows, placed, batch, cfg.batch_size, cfg, stats, want, negs, caps)
        short = cfg.batch_size - len(batch.rows)
        if short and pool:  # only rows of topics already in the batch are left nearby
            relaxed = Caps(query=caps.query)
            stats["rows_over_topic_cap"] += _take(
                pool, rows, placed, batch, short, cfg, stats, want, negs, relaxed
            )
        _close(batch, rows, placed, stats, want, out, negs)
    return out, stats


def _close(batch: _Batch, rows, placed, stats, want, out: list, negs: Kept) -> None:
    """Append ``batch``; one that nothing fit (within the scan limit) takes any row."""
    if not batch.rows:
        i = int(np.flatnonzero(~placed)[0])
        _add(batch, i, rows[i], stats, want, negs)
        placed[i] = True
    out.append(batch.rows)


def _clustered(rows: Sequence[Row], cfg: BatchConfig, rng, want, negs: Kept):
    """``cluster``: same_topic x B rows of one topic, the rest from a global order; ``off`` is
    the same with no rows drawn by topic. The per-query cap applies to both."""
    caps = Caps(query=cfg.max_rows_per_query or None)
    members = _members(rows)
    topic_of = topics_of(rows)
    topics = list(members)
    queues = {t: deque(int(i) for i in rng.permutation(members[t])) for t in topics}
    left = np.array([len(members[t]) for t in topics], dtype=np.float64)
    slot = {t: k for k, t in enumerate(topics)}
    pool = deque(int(i) for i in rng.permutation(len(rows)))
    placed = np.zeros(len(rows), dtype=bool)
    n_same = round(cfg.batch_size * cfg.same_topic) if cfg.topics == "cluster" else 0
    out, stats = [], Counter()
    while not placed.all():
        t = topics[int(rng.choice(len(topics), p=left / left.sum()))]
        batch = _Batch()
        _take(queues[t], rows, placed, batch, n_same, cfg, stats, want, negs, caps)
        _take(pool, rows, placed, batch, cfg.batch_size - len(batch.rows), cfg, stats, want,
              negs, caps)  # fmt: skip
        _close(batch, rows, placed, stats, want, out, negs)
        for i in batch.rows:
            left[slot[int(topic_of[i])]] -= 1
    return out, stats


def _collisions(rows: Sequence[Row], batch: list[int], negs: Kept) -> int:
    """(row, other row's document) pairs in a batch where the document is a known positive of
    the row: the entries the trainer's mask removes. Counted per document (how many rows hold
    it), not per pair of rows: B^2 set intersections at B in the thousands."""
    got = {i: rows[i] for i in batch}
    docs = {j: {r.pos, *(r.negs[k] for k in negs.positions(j))} for j, r in got.items()}
    held = Counter(d for ds in docs.values() for d in ds)
    return sum(held[d] - (d in docs[i]) for i, r in got.items() for d in r.known)
