"""Stage 5 as one call: canonical ids, topics, batches, and the shard table with texts."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from curate import schema
from curate.batch import topics
from curate.batch.compose import Row, compose
from curate.batch.dedup import remap
from curate.config import BatchConfig


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
    mined: pl.DataFrame,
    known: dict[str, list[str]],
    canon: dict[str, str],
    topic_of: dict[str, int],
    rejected: dict[str, set[str]] | None = None,
) -> tuple[pl.DataFrame, list[Row], Counter]:
    """Remap every id to its canonical id; a negative that collapses onto the positive, a known
    positive, another negative of its row or a doc rejected for its query (``rejected``: query
    -> canonical forbidden ids) is dropped and counted."""
    stats: Counter = Counter()
    rows, picks = [], []
    rejected = rejected or {}
    known_of: dict[str, frozenset[str]] = {}  # one set per query, shared by its rows
    for r in mined.iter_rows(named=True):
        pos = canon.get(r["pos_id"], r["pos_id"])
        if (kp := known_of.get(r["query_id"])) is None:
            kp = known_of[r["query_id"]] = frozenset(remap(known[r["query_id"]], canon))
        rej = rejected.get(r["query_id"], frozenset())
        keep, seen = [], set()
        for j, n in enumerate(r["neg_ids"]):
            c = canon.get(n, n)
            if c in kp or c == pos or c in seen or c in rej:
                stats["neg_dropped_as_duplicate"] += 1
                continue
            seen.add(c)
            keep.append((j, c))
        picks.append([j for j, _ in keep])
        rows.append(Row(pos, tuple(c for _, c in keep), kp, topic_of[r["query_id"]], r["query_id"]))
    out = schema.keep_negatives(mined, picks, [list(r.negs) for r in rows]).with_columns(
        pl.Series("pos_id", [r.pos for r in rows], pl.String),
        pl.Series("topic", [r.topic for r in rows], pl.Int32),
    )
    return out, rows, stats


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

    def take_lists(self, lists: list[list[str]] | pa.ListArray | pa.ChunkedArray) -> pa.Array:
        """The texts of each list of ids, as a list column."""
        if isinstance(lists, pa.ChunkedArray):
            lists = lists.combine_chunks()
        ids = lists if isinstance(lists, pa.ListArray) else pa.array(lists, pa.list_(pa.string()))
        offsets = pc.subtract(ids.offsets, ids.offsets[0])  # a slice's offsets start past 0
        return pa.ListArray.from_arrays(offsets, self.take(ids.flatten()))


# The SHARD columns shard_table leaves out, added shard by shard (with_texts): the texts, and
# each row's known positives (NFCorpus: 110k rows x 43 ids, over a GB as one column).
TEXT_COLUMNS = ("query", "pos", "negs", "known_pos_ids")


def known_table(rows: list[Row]) -> pl.DataFrame:
    """query_id -> its known positives (canonical ids, sorted), one row per query."""
    known = {r.query: r.known for r in rows}
    return pl.DataFrame(
        {"query_id": list(known), "known_pos_ids": [sorted(k) for k in known.values()]},
        schema={"query_id": pl.String, "known_pos_ids": pl.List(pl.String)},
    )


def with_texts(rows: pa.Table, doc_text: TextColumn, query_text: TextColumn,
               known: pl.DataFrame) -> pa.Table:
    """Rows of shard_table (one shard's) -> the SHARD table: the query, positive and negative
    texts looked up by id, and the query's known positives (``known_table``)."""
    return _shard_rows(rows, query_text.take(rows.column("query_id")),
                       doc_text.take(rows.column("pos_id")),
                       doc_text.take_lists(rows.column("neg_ids")), known)  # fmt: skip


def with_row_texts(rows: pa.Table, texts: pa.ChunkedArray, known: pl.DataFrame) -> pa.Table:
    """``with_texts`` for rows that carry their query text and their docs' numbers (``query``,
    ``pos_row``, ``neg_rows``: ``text_rows``): the texts taken by number from the corpus's
    text column (a memory-mapped file in a worker), no id looked up."""
    negs = rows.column("neg_rows").combine_chunks()
    offsets = pc.subtract(negs.offsets, negs.offsets[0])
    neg_texts = texts.take(negs.flatten()).combine_chunks().cast(pa.string())
    return _shard_rows(rows, rows.column("query").combine_chunks(),
                       texts.take(rows.column("pos_row")).combine_chunks().cast(pa.string()),
                       pa.ListArray.from_arrays(offsets, neg_texts), known)  # fmt: skip


def text_rows(table: pa.Table, doc_rows, query_text: TextColumn) -> pa.Table:
    """The shard table plus what ``with_row_texts`` reads instead of ids: the query text and the
    row number of the positive and of every negative (``doc_rows``: ids -> numbers)."""
    negs = table.column("neg_ids").combine_chunks()
    offsets = pc.subtract(negs.offsets, negs.offsets[0])
    neg_rows = pa.array(doc_rows(pl.from_arrow(negs.flatten())), pa.int64())
    pos_rows = pa.array(doc_rows(pl.from_arrow(table.column("pos_id"))), pa.int64())
    if pc.any(pc.less(neg_rows, 0)).as_py() or pc.any(pc.less(pos_rows, 0)).as_py():
        raise KeyError("a shard row names a doc id the corpus does not hold")  # a bug, not input
    return table.append_column("query", query_text.take(table.column("query_id"))).append_column(
        "pos_row", pos_rows
    ).append_column("neg_rows", pa.ListArray.from_arrays(offsets, neg_rows))


def fill_shard(rows_path: str, start: int, bounds: tuple[int, ...], out_path: str,
               texts_path: str, known_path: str) -> str:
    """A worker task: rows ``start`` .. of the staged shard rows (``text_rows``, an Arrow file)
    -> one shard file at ``out_path``, its texts read from the memory-mapped corpus texts and
    its queries' known positives from ``known_path``. Arguments are paths and numbers: the
    scheduler carries no text."""
    from curate.batch.shards import write_shard
    from curate.mine.negatives import load_doc_texts

    rows = pa.ipc.open_file(pa.memory_map(rows_path)).read_all().slice(start, bounds[-1])
    queries = pl.from_arrow(rows.column("query_id")).unique()
    known = pl.scan_parquet(known_path).filter(pl.col("query_id").is_in(queries.implode()))
    filled = with_row_texts(rows, load_doc_texts(texts_path), known.collect())
    write_shard(filled, bounds, Path(out_path))
    return out_path


def _shard_rows(rows: pa.Table, query, pos, negs, known: pl.DataFrame) -> pa.Table:
    want = pl.DataFrame({"query_id": pl.from_arrow(rows.column("query_id"))})
    kp = want.join(known, on="query_id", how="left", maintain_order="left")["known_pos_ids"]
    filled = {"query": query, "pos": pos, "negs": negs,
              "known_pos_ids": _arrow(kp, pa.list_(pa.string()))}  # fmt: skip
    return pa.table([filled[f.name] if f.name in filled else rows.column(f.name)
                     for f in schema.SHARD], schema=schema.SHARD)  # fmt: skip


def shard_table(
    rows_df: pl.DataFrame,
    rows: list[Row],
    cfg: BatchConfig,
    seed: int,
    num_negatives: int | None = None,
) -> tuple[pa.Table, Counter, Counter]:
    """Compose batches and lay the rows out in batch order (the SHARD columns but the texts and
    known positives: ``with_texts`` adds them per shard); each row keeps ``num_negatives``
    (None: all) of its mined negatives and spares.
    -> (table, composer statistics, where each row's negatives went: see ``_fate``)."""
    batches, negs, stats = compose(rows, cfg, seed, num_negatives)
    order = [i for b in batches for i in b]
    batch_id = [b for b, rows_b in enumerate(batches) for _ in rows_b]
    df = rows_df[order]
    kept = [negs[i] for i in order]
    # The composer keeps a subset of each row's negatives and spares (those not already in the
    # batch); keep the scores and ranks aligned with the ids that remain.
    fate: Counter = Counter()
    picks = []
    for k, ids in zip(kept, df["neg_ids"].to_list()):
        keep = set(k)
        picks.append([j for j, n in enumerate(ids) if n in keep])
        fate.update(_fate(len(ids), picks[-1], num_negatives))
    cols = {n: v.to_list() for n, v in schema.keep_negatives(df, picks).select(*schema.NEGATIVES)
            .to_dict().items()}  # fmt: skip
    placed = set(order)
    fate["dropped_last"] = sum(
        len(n) for i, n in enumerate(rows_df["neg_ids"].to_list()) if i not in placed
    )
    # What the composer counted while placing rows, replaced by what was kept in the end (its
    # in-batch count also covered rows that drop_last removed afterwards).
    stats["neg_dropped_in_batch"] = fate["dropped_in_batch"]
    stats["neg_spares_used"] = fate.pop("spares_used")
    stats.pop("rows_short_of_negatives", None)  # counted from the table: see shard_counts
    table = pa.table(
        {
            "batch_id": pa.array(batch_id, pa.int64()),
            "query_id": _arrow(df["query_id"], pa.string()),
            "pos_id": _arrow(df["pos_id"], pa.string()),
            "pos_score": _arrow(df["pos_score"], pa.float32()),
            "neg_ids": pa.array(cols["neg_ids"], pa.list_(pa.string())),
            "neg_scores": pa.array(cols["neg_scores"], pa.list_(pa.float32())),
            "neg_ranks": pa.array(cols["neg_ranks"], pa.list_(pa.int32())),
            "topic": _arrow(df["topic"], pa.int32()),
        },
    )
    return table, stats, fate


def _arrow(column: pl.Series, kind: pa.DataType) -> pa.Array:
    """A polars column as one Arrow array of the shard schema's type, without Python objects."""
    arr = column.to_arrow()
    return (arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr).cast(kind)


def _fate(n: int, pick: list[int], want: int | None) -> Counter:
    """Where a placed row's ``n`` negatives went, given the positions ``pick`` kept in the
    shards. The composer walks them in order, skipping any already in the batch, until it has
    ``want``: a skipped one before the last kept, or any skipped when the row is short, was
    already in the batch; those after the last kept, once the row was full, were not needed."""
    full = want is not None and len(pick) >= want
    last = pick[-1] if pick else -1
    taken = set(pick)
    skipped = [j for j in range(n) if j not in taken]
    return Counter(
        kept=len(pick),
        spares_used=sum(j >= want for j in pick) if want is not None else 0,
        dropped_in_batch=sum(not full or j < last for j in skipped),
        spare_unused=sum(full and j > last for j in skipped),
    )


def shard_counts(table: pa.Table, num_negatives: int) -> dict[str, int]:
    """Counts read off the shard table itself (what a trainer will see)."""
    lens = pc.list_value_length(table.column("neg_ids")).to_numpy(zero_copy_only=False)
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
