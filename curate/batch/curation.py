"""Stage 5 as one call: canonical ids, topics, batches, and the shard table with texts."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from curate import schema
from curate.batch import topics
from curate.batch.compose import RowTable, compose
from curate.config import BatchConfig
from curate.mine.negatives import take_strings
from curate.records import IdRows, Known


def canonical_forbidden(forbidden: pa.Table, canon: dict[str, str]) -> pa.Table:
    """Forbidden pairs under canonical doc ids, one row per (query, doc), sorted: the shards
    name a document by its canonical id, so the trainer's mask must too (a rejected duplicate
    would otherwise escape it under its twin's id)."""
    df = pl.from_arrow(forbidden)
    if df.height == 0:
        return forbidden.cast(schema.FORBIDDEN)
    if canon:
        df = df.with_columns(pl.col("doc_id").replace(canon))
    df = df.sort("query_id", "doc_id", "reason", "score", maintain_order=True)
    return df.unique(["query_id", "doc_id"], keep="first", maintain_order=True).to_arrow().cast(
        schema.FORBIDDEN
    )


def build_rows(
    mined: pa.Table | pl.DataFrame,
    known: pl.DataFrame,
    canon: dict[str, str],
    topic_of: dict[str, int],
    doc_ids: pl.Series | IdRows,
    forbidden: pa.Table | None = None,
) -> tuple[pl.DataFrame, RowTable, Counter]:
    """Remap every id to its canonical id; a negative that collapses onto the positive, a known
    positive (``known``: the mined queries' ``known_table``), another negative of its row or a
    doc forbidden for its query (``forbidden``, under canonical ids) is dropped and counted.
    -> (the pairs' query_id, pos_score, and negative scores and ranks so cut, plus topic; the
    composer's rows, ids as doc numbers in ``doc_ids`` (or its ``IdRows``, as the embed record
    keeps it); counts). Doc ids become numbers through one ``IdRows`` of the corpus: an Arrow
    set lookup per id column would build a hash table of every doc id each time (~1.1 GB over
    the driver's size at 10M docs). No Python object per row."""
    stats: Counter = Counter()
    if isinstance(mined, pl.DataFrame):
        mined = mined.to_arrow()
    docs = doc_ids if isinstance(doc_ids, IdRows) else IdRows(doc_ids)
    queries = pc.unique(mined.column("query_id")).cast(pa.string())
    qnum = _numbers(mined.column("query_id"), queries)
    negs = mined.column("neg_ids")  # chunk by chunk (one per mined partition): no combined copy
    lens = pc.fill_null(pc.list_value_length(negs), 0).to_numpy()
    offsets = np.concatenate([[0], np.cumsum(lens, dtype=np.int64)])
    dup, to = docs(list(canon)), docs(list(canon.values()))
    pos = _canonical(docs(pl.from_arrow(mined.column("pos_id"))), dup, to)
    neg = np.empty(int(offsets[-1]), np.int64)
    for r0 in range(0, len(lens), _ROWS_AT_ONCE):  # no Series of every negative's id at once
        a, b = offsets[r0], offsets[min(r0 + _ROWS_AT_ONCE, len(lens))]
        neg[a:b] = docs(pl.from_arrow(pc.list_flatten(negs.slice(r0, _ROWS_AT_ONCE))))
    neg = _canonical(neg, dup, to)
    del negs
    if (pos < 0).any() or (neg < 0).any():
        raise KeyError("a mined pair names a doc id the corpus does not hold")  # a bug, not input
    lists = _arrow(known["known_pos_ids"], pa.list_(pa.string()))
    kq = _numbers(known["query_id"].to_arrow(), queries)[
        pc.list_parent_indices(lists).to_numpy()]  # fmt: skip
    kc = docs(pl.from_arrow(lists.flatten()))
    by_query = np.argsort(kq, kind="stable")  # the RowTable's known slices are by query number
    kq, kc = kq[by_query], kc[by_query]
    fb = forbidden if forbidden is not None else schema.FORBIDDEN.empty_table()
    fq, fc = _numbers(fb.column("query_id"), queries), docs(pl.from_arrow(fb.column("doc_id")))
    # (query, doc) as one integer; a known or forbidden doc outside the corpus (-1) or a forbidden
    # pair of another query matches no negative.
    n = len(doc_ids) + 1
    known_keys, forbidden_keys = np.sort(kq * n + kc), np.sort((fq * n + fc)[fq >= 0])
    first = np.zeros(len(neg), dtype=bool)  # a doc's first place in its row, of those not dropped
    for r0 in range(0, len(qnum), _ROWS_AT_ONCE):  # a bounded share of the negatives at a time
        r1 = min(r0 + _ROWS_AT_ONCE, len(qnum))
        a, b = offsets[r0], offsets[r1]
        row = np.repeat(np.arange(r0, r1), np.diff(offsets[r0 : r1 + 1]))
        c = neg[a:b]
        key = qnum[row] * n + c
        ok = np.flatnonzero((c != pos[row]) & ~_member(known_keys, key)
                            & ~_member(forbidden_keys, key))  # fmt: skip
        _, at = np.unique((row * n + c)[ok], return_index=True)
        first[a + ok[at]] = True
    if dropped := int(len(neg) - first.sum()):
        stats["neg_dropped_as_duplicate"] = dropped
    keep = np.flatnonzero(first)
    topic_q = np.array([topic_of[q] for q in queries.to_pylist()], dtype=np.int64)
    rows = RowTable(
        pos=pos, neg_offsets=np.concatenate([[0], np.cumsum(first)])[offsets], negs=neg[keep],
        topic=topic_q[qnum], query=qnum,
        known_offsets=_offsets(kq[kc >= 0], len(queries)), known=kc[kc >= 0],
    )  # fmt: skip
    # The ids live on as doc numbers in ``rows`` (the shard tasks turn them back into ids).
    frame = pl.from_arrow(mined.select(["query_id", "pos_score", "neg_scores", "neg_ranks"]))
    out = frame.select("query_id", "pos_score").with_columns(
        *(_relist(name, rows.neg_offsets, _flat(frame[name]).take(keep), kind)
          for name, kind in (("neg_scores", pl.Float32), ("neg_ranks", pl.Int32))),
        pl.Series("topic", rows.topic, pl.Int32),
    )  # fmt: skip
    return out, rows, stats


_ROWS_AT_ONCE = 100_000


def _find(sorted_keys: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(place in ``sorted_keys`` (non-empty), found) of each of ``keys``."""
    at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return at, sorted_keys[at] == keys


def _member(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Bool [len(keys)]: each key is in ``sorted_keys``."""
    if not len(sorted_keys):
        return np.zeros(len(keys), dtype=bool)
    return _find(sorted_keys, keys)[1]


def _numbers(ids: pa.Array | pa.ChunkedArray, keys: pa.Array) -> np.ndarray:
    """The place of each of ``ids`` in ``keys`` (-1 where absent), by Arrow's hash lookup."""
    got = pc.index_in(ids if ids.type == keys.type else ids.cast(keys.type), value_set=keys)
    return pc.fill_null(got, -1).to_numpy().astype(np.int64)


def _canonical(rows: np.ndarray, dup: np.ndarray, to: np.ndarray) -> np.ndarray:
    """Doc numbers with each duplicate's (``dup``) replaced by its canonical doc's (``to``)."""
    if not len(dup):
        return rows
    order = np.argsort(dup)
    at, hit = _find(dup[order], rows)
    to = to[order]
    out = rows.copy()
    out[hit] = to[at[hit]]
    return out


def _offsets(owner: np.ndarray, n: int) -> np.ndarray:
    """[n + 1] list offsets of values whose list numbers ``owner`` are sorted."""
    return np.concatenate([[0], np.cumsum(np.bincount(owner, minlength=n))]).astype(np.int64)


def _flat(column: pl.Series) -> pa.Array:
    """A list column's values, one array."""
    return _one(column.to_arrow()).flatten()


def _relist(name: str, offsets: np.ndarray, values: pa.Array, kind) -> pl.Series:
    """A list column of ``values`` cut at ``offsets``."""
    lists = pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), values)
    return pl.Series(name, pl.from_arrow(lists), pl.List(kind))


def known_pairs(known: Mapping[str, list[str]], canon: dict[str, str],
                queries: pl.Series) -> pl.DataFrame:
    """(q: the query's place in ``queries``, doc_id: a known positive, canonical), each pair
    once, sorted by q and doc_id."""
    counts, docs = Known.of(known).flat(queries)
    df = pl.DataFrame({"q": np.repeat(np.arange(len(counts), dtype=np.int64), counts),
                       "doc_id": docs})  # fmt: skip
    if canon:
        df = df.with_columns(pl.col("doc_id").replace(canon))
    return df.unique(maintain_order=True).sort("q", "doc_id")


def query_topics(
    query_ids: list[str], vecs: np.ndarray, cfg: BatchConfig, seed: int
) -> dict[str, int]:
    return dict(zip(query_ids, topic_labels(vecs, cfg, seed).tolist()))


def topic_labels(vecs: np.ndarray, cfg: BatchConfig, seed: int) -> np.ndarray:
    """[Q] topic (k-means cluster) of each training query's vector."""
    return topics.cluster(vecs, topics.n_topics_for(len(vecs), cfg.n_topics, cfg.batch_size), seed)


class TextColumn:
    """id -> text over an id column and a text column, looked up by a join per column of ids:
    no dict of every document (10M at MS MARCO scale) is built for the shards' texts."""

    def __init__(self, ids: pl.Series | list[str], texts: pl.Series | list[str]):
        self.table = pl.DataFrame({"id": pl.Series(ids, dtype=pl.String),
                                   "text": pl.Series(texts, dtype=pl.String)})  # fmt: skip

    def take(self, ids: pl.Series | list[str] | pa.Array | pa.ChunkedArray) -> pa.Array:
        """The texts of ``ids``, in order; an unknown id is an error (a bug, not bad input)."""
        if isinstance(ids, (pa.Array, pa.ChunkedArray)):
            ids = pl.from_arrow(ids)
        want = pl.DataFrame({"id": pl.Series(ids, dtype=pl.String)})
        got = want.join(self.table, on="id", how="left", maintain_order="left")["text"]
        if got.null_count():
            missing = want.filter(got.is_null())["id"].head(3).to_list()
            raise KeyError(f"ids without a text: {missing}")
        return got.to_arrow().cast(pa.string())


# The SHARD columns shard_table leaves out, added shard by shard (with_row_texts): the texts and
# doc ids (shard_table holds doc numbers), and each row's known positives (NFCorpus: 110k rows
# x 43 ids, over a GB as one column).
TEXT_COLUMNS = ("query", "pos_id", "pos", "neg_ids", "negs", "known_pos_ids")


def known_table(known: Mapping[str, list[str]], canon: dict[str, str],
                query_ids: pl.Series) -> pl.DataFrame:
    """query_id -> its known positives (canonical ids, sorted), one row per query of the rows."""
    queries = query_ids.unique(maintain_order=True)
    kp = known_pairs(known, canon, queries)
    offsets = _offsets(kp["q"].to_numpy(), len(queries))
    return pl.DataFrame({"query_id": queries.rename("query_id"),
                         "known_pos_ids": _relist("known_pos_ids", offsets, kp["doc_id"].to_arrow(),
                                                  pl.String)})  # fmt: skip


def with_row_texts(rows: pa.Table, texts: pa.ChunkedArray, ids: pa.Array,
                   known: pl.DataFrame) -> pa.Table:
    """Rows of ``text_rows`` (one shard's: they carry their query text and their docs' numbers,
    ``pos_row`` and ``neg_rows``) -> the SHARD table: the docs' ids and texts taken by number
    from the corpus's id and text columns (memory-mapped files in a worker), and the query's
    known positives (``known_table``)."""
    negs = rows.column("neg_rows").combine_chunks()
    offsets = pc.subtract(negs.offsets, negs.offsets[0])  # a slice's offsets start past 0
    pos, flat, take = _one(rows.column("pos_row")), negs.flatten(), take_strings
    return _shard_rows(rows, {
        "query": rows.column("query").combine_chunks().cast(pa.string()),
        "pos_id": take(ids, pos), "pos": take(texts, pos),
        "neg_ids": pa.ListArray.from_arrays(offsets, take(ids, flat)),
        "negs": pa.ListArray.from_arrays(offsets, take(texts, flat)),
    }, known)  # fmt: skip


def text_rows(table: pa.Table, query_text: TextColumn) -> pa.Table:
    """The shard table (``shard_table``: it carries the docs' numbers, ``pos_row`` and
    ``neg_rows``) plus the query text: what ``with_row_texts`` reads instead of ids."""
    return table.append_column("query", query_text.take(table.column("query_id")))


def fill_shard(rows_path: str, start: int, bounds: tuple[int, ...], out_path: str,
               texts_path: str, ids_path: str, known_path: str) -> str:
    """A worker task: rows ``start`` .. of the staged shard rows (``text_rows``, an Arrow file)
    -> one shard file at ``out_path``, its texts read from the memory-mapped corpus texts, its
    doc ids from the index stage's mapped id file and its queries' known positives from
    ``known_path``. Arguments are paths and numbers: the scheduler carries no text."""
    from curate.batch.shards import write_shard
    from curate.mine.negatives import load_doc_ids, load_doc_texts

    rows = pa.ipc.open_file(pa.memory_map(rows_path)).read_all().slice(start, bounds[-1])
    queries = pl.from_arrow(rows.column("query_id")).unique()
    known = pl.scan_parquet(known_path).filter(pl.col("query_id").is_in(queries.implode()))
    filled = with_row_texts(rows, load_doc_texts(texts_path), load_doc_ids(ids_path),
                            known.collect())
    write_shard(filled, bounds, Path(out_path))
    return out_path


def _shard_rows(rows: pa.Table, filled: dict, known: pl.DataFrame) -> pa.Table:
    want = pl.DataFrame({"query_id": pl.from_arrow(rows.column("query_id"))})
    kp = want.join(known, on="query_id", how="left", maintain_order="left")["known_pos_ids"]
    filled = {**filled, "known_pos_ids": _arrow(kp, pa.list_(pa.string()))}
    return pa.table([filled[f.name] if f.name in filled else rows.column(f.name)
                     for f in schema.SHARD], schema=schema.SHARD)  # fmt: skip


def shard_table(
    rows_df: pl.DataFrame,
    rows: RowTable,
    cfg: BatchConfig,
    seed: int,
    num_negatives: int | None = None,
) -> tuple[pa.Table, Counter, Counter]:
    """Compose batches and lay the rows out in batch order: the SHARD columns but the doc ids,
    texts and known positives (``with_row_texts`` adds them per shard, from ``pos_row`` and
    ``neg_rows``: the docs' numbers). Each row keeps ``num_negatives`` (None: all) of its mined
    negatives and spares.
    -> (table, composer statistics, where each row's negatives went: see ``_fate``)."""
    batches, kept, stats = compose(rows, cfg, seed, num_negatives)
    sizes = np.array([len(b) for b in batches], dtype=np.int64)
    order = np.fromiter((i for b in batches for i in b), dtype=np.int64, count=int(sizes.sum()))
    # The placed rows' negatives as flat positions: ``owner`` (placed row), ``rel`` (place in
    # its row), ``flat`` (in the rows' flattened lists); the composer kept those ``keep``.
    # int32 while they fit: four arrays of every negative (10M at 1M rows)
    ix = np.int32 if len(kept.mask) < 2**31 else np.int64
    lens = np.diff(rows.neg_offsets)[order]
    owner = np.repeat(np.arange(len(order), dtype=ix), lens)
    starts = (np.cumsum(lens) - lens).astype(ix)
    rel = np.arange(int(lens.sum()), dtype=ix) - np.repeat(starts, lens)
    flat = np.repeat(rows.neg_offsets[order].astype(ix), lens) + rel
    keep = kept.mask[flat]
    fate = _fate(owner, rel, keep, len(order), num_negatives)
    fate["dropped_last"] = int(len(kept.mask) - len(flat))  # the negatives of rows not placed
    # What the composer counted while placing rows, replaced by what was kept in the end (its
    # in-batch count also covered rows that drop_last removed afterwards).
    stats["neg_dropped_in_batch"] = fate["dropped_in_batch"]
    stats["neg_spares_used"] = fate.pop("spares_used")
    stats.pop("rows_short_of_negatives", None)  # counted from the table: see shard_counts
    offsets = _offsets(owner[keep], len(order))
    take = pa.array(flat[keep])
    df = rows_df.select("query_id", "pos_score", "topic")[order]
    negs = {name: pa.ListArray.from_arrays(pa.array(offsets, pa.int32()),
                                           _flat(rows_df[name]).take(take).cast(kind))
            for name, kind in (("neg_scores", pa.float32()), ("neg_ranks", pa.int32()))}
    table = pa.table(
        {
            "batch_id": pa.array(np.repeat(np.arange(len(batches)), sizes), pa.int64()),
            "query_id": _arrow(df["query_id"], pa.string()),
            "pos_score": _arrow(df["pos_score"], pa.float32()),
            **negs,
            "topic": _arrow(df["topic"], pa.int32()),
            "pos_row": pa.array(rows.pos[order], pa.int64()),
            "neg_rows": pa.ListArray.from_arrays(pa.array(offsets, pa.int32()),
                                                 pa.array(rows.negs[flat[keep]], pa.int64())),
        },
    )  # fmt: skip
    return table, stats, fate


def _arrow(column: pl.Series, kind: pa.DataType) -> pa.Array:
    """A polars column as one Arrow array of the shard schema's type, without Python objects."""
    return _one(column.to_arrow()).cast(kind)


def _one(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One Arrow array, its chunks combined."""
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


def _fate(owner: np.ndarray, rel: np.ndarray, keep: np.ndarray, n_rows: int,
          want: int | None) -> Counter:
    """Where the placed rows' negatives went: negative k is at place ``rel[k]`` of placed row
    ``owner[k]``, and ``keep[k]`` says whether the shards hold it. The composer walks a row's
    negatives in order, skipping any already in the batch, until it has ``want``: a skipped one
    before the last kept, or any skipped when the row is short, was already in the batch; those
    after the last kept, once the row was full, were not needed."""
    n_kept = np.bincount(owner[keep], minlength=n_rows)
    full = n_kept >= want if want is not None else np.zeros(n_rows, dtype=bool)
    last = np.full(n_rows, -1, dtype=np.int64)
    np.maximum.at(last, owner[keep], rel[keep])
    skip_owner, skip_rel = owner[~keep], rel[~keep]
    skip_full, skip_last = full[skip_owner], last[skip_owner]
    return Counter(
        kept=int(keep.sum()),
        spares_used=int((rel[keep] >= want).sum()) if want is not None else 0,
        dropped_in_batch=int((~skip_full | (skip_rel < skip_last)).sum()),
        spare_unused=int((skip_full & (skip_rel > skip_last)).sum()),
    )


def shard_counts(table: pa.Table, num_negatives: int) -> dict[str, int]:
    """Counts read off the shard table itself (what a trainer will see)."""
    lens = pc.list_value_length(table.column("neg_rows")).to_numpy(zero_copy_only=False)
    return {
        "rows": table.num_rows,
        "negatives": int(lens.sum()),
        "rows_without_negatives": int((lens == 0).sum()),
        "rows_short_of_negatives": int((lens < num_negatives).sum()),
    }


def shard_funnel(mined_funnel: dict, dropped_as_duplicate: int, fate: dict) -> dict[str, int]:
    """The mining funnel carried on to what the shards hold: every candidate ends in one
    reason, and ``kept`` is the negatives in the shards, so candidates = the sum of the rest.

    Mining's ``kept`` and ``spare`` (chosen negatives and their backups) are split by stage 5
    into dropped_as_duplicate (collapsed onto another id of the row by canonical ids),
    dropped_in_batch (already in the row's batch), spare_unused (backups not needed),
    dropped_last (rows removed by batch.drop_last) and kept."""
    out = {k: int(v) for k, v in mined_funnel.items() if k not in ("kept", "spare")}
    out["dropped_as_duplicate"] = int(dropped_as_duplicate)
    out.update({k: int(v) for k, v in fate.items()})
    return dict(sorted(out.items()))


def funnel_balance(funnel: dict) -> int:
    """candidates minus every other bucket: 0 when the funnel reconciles."""
    return funnel.get("candidates", 0) - sum(v for k, v in funnel.items() if k != "candidates")
