"""Stage 4: mine hard negatives for (query, positive) pairs and filter likely false negatives.

For each pair the query's top-k candidates pass, in order, through rules that each name their
reason and are counted (the filter funnel):

  known_positive          any qrels positive of the query (all of them, not only this pair's)
  duplicate_of_positive   same normalised-text hash as one of the query's positives
  near_duplicate          cosine to one of the query's positives above ``near_dup_threshold``
  above_ceiling           score > max_relative * score(query, positive) (NV-Retriever TopK-PercPos);
                          with several known positives, the best-scoring one sets the ceiling
                          for every pair of the query, so a doc is suspect for all of a query's
                          pairs or for none (forbidden pairs are per query, and so is the mask);
                          the weakest positive would reject most candidates on data where
                          positives score unevenly (80% of Cranfield's candidates)
  out_of_window           retrieval rank outside [range_min, range_max)
  ngram_duplicate         word 3-gram Jaccard with one of the query's positives above
                          ``ngram_threshold`` (normalised text); checked only on candidates that
                          passed every rule above, with texts read from the block's ``doc_texts``
  not_selected            eligible, but ``num_negatives`` + ``spare_negatives`` were already kept

Kept negatives are stored in preference order: the ``num_negatives`` the row should train on,
then ``spare_negatives`` backups (funnel "spare"). Stage 5 trains each row on its first
``num_negatives`` that are not already in the row's batch, so a negative another row of the
batch already brings is replaced by the next eligible candidate instead of leaving the row short.

All but out_of_window and not_selected are likely false negatives: they are returned as
forbidden (query, doc, reason) rows that the trainer's mask obeys. Random choices are seeded by
(seed, query_id, pos_id), so the output does not depend on how the queries were partitioned.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa

from curate.config import MineConfig
from curate.files import atomic_path, slices, write_arrow
from curate.schema import FALSE_NEGATIVE_REASONS
from curate.text import ngrams

CEILING_FROM = {"best": np.max, "median": np.median, "weakest": np.min}
# Docs whose n-gram sets a mine task keeps in memory at once (a few hundred bytes each).
NGRAM_CACHE = 200_000


def stable_seed(seed: int, *keys: str) -> list[int]:
    """Entropy for numpy's SeedSequence from a seed and string keys, same on every machine."""
    digest = hashlib.blake2b("\x1f".join(keys).encode("utf-8"), digest_size=16).digest()
    return [seed, *np.frombuffer(digest, dtype=np.uint32).tolist()]


@dataclass
class PairBlock:
    """Integer view of one partition of training pairs; doc numbers index the corpus matrix.
    The driver holds every block while mining, so there its ids are polars Series and its known
    positives one ``Ragged`` (a list of a Python string or array per query was ~0.36 GB at 1M
    queries); the mine task reads lists back (``load_block``)."""

    query_ids: Sequence[str]  # [Q]
    query_vecs: np.ndarray | None  # [Q, D]; None until the mine task reads them (query_rows)
    pair_query: np.ndarray  # [P] row in query_ids
    pair_pos: np.ndarray  # [P] doc number of the pair's positive
    known: Sequence[np.ndarray]  # [Q] doc numbers of every known positive of the query
    pos_ids: Sequence[str]  # [P] doc id of the pair's positive (for seeding)
    doc_texts: str | None = None  # Arrow file of doc texts by doc number (n-gram rule); None: off
    query_rows: np.ndarray | None = None  # [Q] rows of the queries in the run's query vectors


class Ragged(Sequence):
    """Arrays ``values[offsets[i]:offsets[i + 1]]``, one flat array behind a sequence."""

    def __init__(self, values: np.ndarray, offsets: np.ndarray):
        self.values, self.offsets = values, offsets

    @classmethod
    def of(cls, arrays: Sequence[np.ndarray]) -> Ragged:
        if isinstance(arrays, Ragged):
            return arrays
        lens = np.array([len(a) for a in arrays], dtype=np.int64)
        return cls(np.concatenate([np.empty(0, np.int64), *arrays]).astype(np.int64),
                   np.concatenate([[0], np.cumsum(lens)]).astype(np.int64))  # fmt: skip

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            raise TypeError("Ragged takes one index")
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"Ragged index {i} out of range for {n} arrays")
        i %= n
        return self.values[self.offsets[i] : self.offsets[i + 1]]


def save_block(path: Path, block: PairBlock) -> None:
    """A block as a ``.npz`` without its vectors (no pickle: the mine task that reads it runs
    no code from a file); the ragged known-positive lists as values and offsets."""
    known = Ragged.of(block.known)
    with atomic_path(path, ".tmp.npz") as tmp:
        np.savez(
            tmp, query_ids=np.array(list(block.query_ids), dtype=str),
            pair_query=block.pair_query, pair_pos=block.pair_pos,
            known_len=np.diff(known.offsets), known=known.values,
            pos_ids=np.array(list(block.pos_ids), dtype=str), query_rows=block.query_rows,
            doc_texts=np.array(block.doc_texts or "", dtype=str),
        )  # fmt: skip


def load_block(path: str, query_vecs: np.ndarray) -> PairBlock:
    """The block ``save_block`` wrote, with its queries' vectors."""
    z = np.load(path, allow_pickle=False)
    known = np.split(z["known"], np.cumsum(z["known_len"])[:-1]) if len(z["known_len"]) else []
    return PairBlock(
        query_ids=z["query_ids"].tolist(), query_vecs=query_vecs, pair_query=z["pair_query"],
        pair_pos=z["pair_pos"], known=known, pos_ids=z["pos_ids"].tolist(),
        doc_texts=str(z["doc_texts"]) or None, query_rows=z["query_rows"],
    )  # fmt: skip


@dataclass
class MineResult:
    pair: np.ndarray  # [P] pair number within the block
    pos_score: np.ndarray  # [P]
    neg_docs: list[np.ndarray]  # [P] kept doc numbers, best first
    neg_scores: list[np.ndarray]
    neg_ranks: list[np.ndarray]
    forbidden: list[tuple[int, int, str]] = field(default_factory=list)  # (query row, doc, reason)
    forbidden_scores: list[float] = field(default_factory=list)  # query-doc score of each
    funnel: Counter = field(default_factory=Counter)


def _ceiling_reference(block: PairBlock, qi: int, doc_vecs: np.ndarray, cfg: MineConfig) -> float:
    """The score ``mine.ceiling_from`` picks among query ``qi``'s known positives
    (``ceiling_over: known``) or among the positives of its training rows (``trained``)."""
    if cfg.ceiling_over == "known":
        docs = block.known[qi]
    else:
        docs = block.pair_pos[block.pair_query == qi]
    return float(CEILING_FROM[cfg.ceiling_from](doc_vecs[docs] @ block.query_vecs[qi]))


def mine_block(
    block: PairBlock,
    scores: np.ndarray,
    cands: np.ndarray,
    doc_vecs: np.ndarray,
    doc_hash: np.ndarray,
    cfg: MineConfig,
    seed: int,
) -> MineResult:
    """Filter and select negatives; ``scores``/``cands`` are the [Q, k] search results."""
    P = len(block.pair_query)
    res = MineResult(np.arange(P), np.empty(P, np.float32), [], [], [])
    seen_forbidden: set[tuple[int, int]] = set()
    texts = None
    if block.doc_texts is not None and cfg.ngram_threshold is not None:
        texts = load_doc_texts(block.doc_texts)
    grams: dict[int, set[str]] = {}
    query_reason, reason_of, ref_query, query_ref = None, None, None, 0.0
    for p in range(P):
        qi, pos = int(block.pair_query[p]), int(block.pair_pos[p])
        known = block.known[qi]
        pos_score = float(block.query_vecs[qi] @ doc_vecs[pos])
        res.pos_score[p] = pos_score
        valid = cands[qi] >= 0
        cand, cand_score = cands[qi][valid], scores[qi][valid]
        ranks = np.flatnonzero(valid).astype(np.int32)
        if not len(known):
            ref = pos_score
        else:
            if qi != ref_query:  # one reference per query: score its positives once
                ref_query, query_ref = qi, _ceiling_reference(block, qi, doc_vecs, cfg)
            ref = query_ref
        if (qi, ref) != reason_of:  # one ceiling per query (mine.ceiling_from), so the pairs of
            # one query (adjacent in a block) share every verdict: judge its candidates once
            query_reason = _reasons(cand, cand_score, ranks, known, ref, doc_vecs, doc_hash, cfg)
            if texts is not None and len(known):
                if len(grams) > NGRAM_CACHE:
                    grams.clear()
                left = np.flatnonzero(query_reason == "")
                dup = _ngram_duplicates(cand[left], known, texts, cfg.ngram_threshold, grams)
                query_reason[left[dup]] = "ngram_duplicate"
            reason_of = (qi, ref)
            for c, r, s in zip(cand, query_reason, cand_score, strict=True):
                if r in FALSE_NEGATIVE_REASONS and (qi, int(c)) not in seen_forbidden:
                    seen_forbidden.add((qi, int(c)))
                    res.forbidden.append((qi, int(c), r))
                    res.forbidden_scores.append(float(s))
        reason = query_reason.copy()
        eligible = np.flatnonzero(reason == "")
        chosen = _select(eligible, cfg, stable_seed(seed, block.query_ids[qi], block.pos_ids[p]))
        unchosen = np.zeros(len(reason), bool)
        unchosen[eligible] = True
        unchosen[chosen] = False
        reason[unchosen] = "not_selected"
        res.funnel["candidates"] += len(cand)
        res.funnel.update(r for r in reason.tolist() if r)
        res.funnel["kept"] += min(len(chosen), cfg.num_negatives)
        if len(chosen) > cfg.num_negatives:
            res.funnel["spare"] += len(chosen) - cfg.num_negatives
        res.neg_docs.append(cand[chosen].astype(np.int64))
        res.neg_scores.append(cand_score[chosen].astype(np.float32))
        res.neg_ranks.append(ranks[chosen])
    return res


def _reasons(cand, cand_score, ranks, known, pos_score, doc_vecs, doc_hash, cfg: MineConfig):
    """The first rule each candidate fails, '' where it passes all (vectorised over candidates)."""
    reason = np.full(len(cand), "", dtype=object)

    def mark(hit: np.ndarray, name: str) -> None:
        reason[(reason == "") & hit] = name

    mark(np.isin(cand, known), "known_positive")
    if len(known):
        mark(np.isin(doc_hash[cand], doc_hash[known]), "duplicate_of_positive")
        cos = doc_vecs[cand] @ doc_vecs[known].T  # [k, |known|]
        mark(cos.max(axis=1) > cfg.near_dup_threshold, "near_duplicate")
    if cfg.max_relative is not None:
        mark(cand_score > cfg.max_relative * pos_score, "above_ceiling")
    mark((ranks < cfg.range_min) | (ranks >= cfg.range_max), "out_of_window")
    return reason


def _select(eligible: np.ndarray, cfg: MineConfig, entropy: list[int]) -> np.ndarray:
    """Positions of the kept negatives among the candidates in preference order: the first
    ``num_negatives`` in rank order, then the spares (rank order for "top", drawn order else)."""
    n, total = cfg.num_negatives, cfg.num_negatives + cfg.spare_negatives
    if cfg.strategy == "top" or len(eligible) <= n:
        return eligible[:total]
    rng = np.random.default_rng(entropy)
    drawn = rng.choice(eligible, min(total, len(eligible)), replace=False)
    return np.concatenate([np.sort(drawn[:n]), drawn[n:]])


# --- the n-gram rule: doc texts by doc number, memory-mapped -------------------------------


# doc_texts.arrow: one text per doc number (written here or streamed by the read stage).
DOC_TEXTS = pa.schema([("text", pa.large_string())])
DOC_IDS = pa.schema([("doc_id", pa.large_string())])


def write_doc_texts(path: Path, texts) -> None:
    """Doc texts in doc-number order as an uncompressed Arrow file (temp name, then rename), so
    mine tasks memory-map it and read only the pages of the docs they compare."""
    _write_column(path, texts, DOC_TEXTS)


def write_doc_ids(path: Path, ids) -> None:
    """Doc ids in doc-number order, mapped as the texts are: a task that names a few thousand
    docs touches their pages only, where reading a Parquet id column would cost every task all
    the ids (10M, ~1 s and ~0.2 GB each, at MS MARCO scale)."""
    _write_column(path, ids, DOC_IDS)


_WRITE_ROWS = 1 << 20  # values converted and written at a time


def _write_column(path: Path, values, schema: pa.Schema) -> None:
    """``values`` (Arrow, a polars Series or a list) a slice at a time: converted whole, 10M ids
    were a second copy of the column in the driver (+0.17 GB as large_string)."""
    if not hasattr(values, "slice"):
        values = pa.array(list(values), pa.string())
    write_arrow(path, (pa.table([text_array(part).cast(schema[0].type)], schema=schema)
                       for part in slices(values, _WRITE_ROWS)))  # fmt: skip


def text_array(texts) -> pa.Array | pa.ChunkedArray:
    """Texts as Arrow: mapped Arrow as it is, a polars Series or a list converted."""
    if isinstance(texts, (pa.Array, pa.ChunkedArray)):
        return texts
    return texts.to_arrow() if hasattr(texts, "to_arrow") else pa.array(texts, pa.string())


def load_doc_column(path: str) -> pa.ChunkedArray:
    """The column written by ``write_doc_texts`` or ``write_doc_ids``, memory-mapped; cached per
    process until the file changes."""
    return _open_column(path, os.stat(path).st_mtime_ns)


load_doc_texts = load_doc_ids = load_doc_column  # the names say which file a caller reads


@lru_cache(maxsize=2)  # a worker's texts and ids
def _open_column(path: str, mtime_ns: int) -> pa.ChunkedArray:
    return pa.ipc.open_file(pa.memory_map(path)).read_all().column(0)


def take_strings(column: pa.Array | pa.ChunkedArray, rows) -> pa.Array:
    """``column``'s values at ``rows`` (doc numbers) as one ``string`` array, the shard and
    mined schemas' type (the mapped columns are large_string, in chunks)."""
    taken = column.take(pa.array(rows, pa.int64()) if not isinstance(rows, pa.Array) else rows)
    return (taken.combine_chunks() if isinstance(taken, pa.ChunkedArray) else taken).cast(
        pa.string())


def _ngram_duplicates(cand, known, texts, threshold: float, grams: dict) -> np.ndarray:
    """Bool [len(cand)]: word 3-gram Jaccard with one of the ``known`` docs > ``threshold``, as
    ``curate.text.ngram_overlap`` computes it; ``grams`` caches each doc's n-grams as hashes."""

    def of(d: int) -> np.ndarray:
        if d not in grams:  # str hashes differ between processes; this cache is per process
            g = ngrams(texts[d].as_py())
            grams[d] = np.fromiter(map(hash, g), np.int64, len(g))
        return grams[d]

    pos = [of(int(d)) for d in known]
    sets = [of(int(c)) for c in cand]
    if not pos or not sets:
        return np.zeros(len(cand), bool)
    # Intersection sizes of every (candidate, positive) pair in one sort-merge join: each
    # candidate n-gram is looked up among the positives' sorted n-grams.
    size_c, size_p = np.array([len(a) for a in sets]), np.array([len(b) for b in pos])
    pk = np.concatenate(pos)
    owner = np.repeat(np.arange(len(pos)), size_p)
    order = np.argsort(pk, kind="stable")
    pk, owner = pk[order], owner[order]
    ck = np.concatenate(sets)
    holder = np.repeat(np.arange(len(sets)), size_c)
    order = np.argsort(ck)  # sorted needles search 3x faster
    ck, holder = ck[order], holder[order]
    lo, hi = np.searchsorted(pk, ck, "left"), np.searchsorted(pk, ck, "right")
    n = hi - lo
    which = np.repeat(np.arange(len(ck)), n)  # one entry per (candidate n-gram, match)
    match = lo[which] + np.arange(len(which)) - np.repeat(np.cumsum(n) - n, n)
    pair = holder[which] * len(pos) + owner[match]
    inter = np.bincount(pair, minlength=len(sets) * len(pos)).reshape(len(sets), len(pos))
    union = size_c[:, None] + size_p[None, :] - inter
    return (inter > threshold * union).any(axis=1)
