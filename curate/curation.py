"""Stage 5 as one call: canonical ids, topics, batches, and the shard table with texts."""

from __future__ import annotations

from collections import Counter

import numpy as np
import polars as pl
import pyarrow as pa

from curate import schema, topics
from curate.batches import Row, compose
from curate.config import BatchConfig
from curate.dedup import remap


def build_rows(
    mined: pl.DataFrame, known: dict[str, list[str]], canon: dict[str, str], topic_of: dict[str, int]
) -> tuple[pl.DataFrame, list[Row], Counter]:
    """Remap every id to its canonical id; a negative that collapses onto the positive, a known
    positive or another negative of its row is dropped and counted."""
    stats: Counter = Counter()
    rows, neg_cols = [], {"neg_ids": [], "neg_scores": [], "neg_ranks": []}
    for r in mined.iter_rows(named=True):
        pos = canon.get(r["pos_id"], r["pos_id"])
        kp = frozenset(remap(known[r["query_id"]], canon))
        keep, seen = [], set()
        for j, n in enumerate(r["neg_ids"]):
            c = canon.get(n, n)
            if c in kp or c == pos or c in seen:
                stats["neg_dropped_as_duplicate"] += 1
                continue
            seen.add(c)
            keep.append((c, r["neg_scores"][j], r["neg_ranks"][j]))
        neg_cols["neg_ids"].append([k[0] for k in keep])
        neg_cols["neg_scores"].append([k[1] for k in keep])
        neg_cols["neg_ranks"].append([k[2] for k in keep])
        rows.append(Row(pos, tuple(k[0] for k in keep), kp, topic_of[r["query_id"]], r["query_id"]))
    out = mined.with_columns(
        pl.Series("pos_id", [r.pos for r in rows], pl.String),
        pl.Series("neg_ids", neg_cols["neg_ids"], pl.List(pl.String)),
        pl.Series("neg_scores", neg_cols["neg_scores"], pl.List(pl.Float32)),
        pl.Series("neg_ranks", neg_cols["neg_ranks"], pl.List(pl.Int32)),
        pl.Series("known_pos_ids", [sorted(r.known) for r in rows], pl.List(pl.String)),
        pl.Series("topic", [r.topic for r in rows], pl.Int32),
    )
    return out, rows, stats


def query_topics(query_ids: list[str], vecs: np.ndarray, cfg: BatchConfig, seed: int) -> dict[str, int]:
    k = topics.n_topics_for(len(query_ids), cfg.n_topics, cfg.batch_size)
    return dict(zip(query_ids, topics.cluster(vecs, k, seed).tolist()))


def shard_table(
    rows_df: pl.DataFrame,
    rows: list[Row],
    cfg: BatchConfig,
    seed: int,
    doc_text: dict[str, str],
    query_text: dict[str, str],
    num_negatives: int | None = None,
) -> tuple[pa.Table, Counter]:
    """Compose batches and lay the rows out in batch order with their texts (SHARD schema);
    each row keeps ``num_negatives`` (None: all) of its mined negatives and spares."""
    batches, negs, stats = compose(rows, cfg, seed, num_negatives)
    order = [i for b in batches for i in b]
    batch_id = [b for b, rows_b in enumerate(batches) for _ in rows_b]
    df = rows_df[order]
    kept = [negs[i] for i in order]
    # The composer keeps a subset of each row's negatives and spares (those not already in the
    # batch); keep the scores and ranks aligned with the ids that remain.
    cols = {"neg_ids": [], "neg_scores": [], "neg_ranks": []}
    for k, r in zip(kept, df.select("neg_ids", "neg_scores", "neg_ranks").iter_rows()):
        keep = set(k)
        pick = [j for j, n in enumerate(r[0]) if n in keep]
        cols["neg_ids"].append([r[0][j] for j in pick])
        cols["neg_scores"].append([r[1][j] for j in pick])
        cols["neg_ranks"].append([r[2][j] for j in pick])
    table = pa.table(
        {
            "batch_id": pa.array(batch_id, pa.int64()),
            "query_id": df["query_id"].to_list(),
            "query": [query_text[q] for q in df["query_id"]],
            "pos_id": df["pos_id"].to_list(),
            "pos": [doc_text[d] for d in df["pos_id"]],
            "pos_score": pa.array(df["pos_score"].to_list(), pa.float32()),
            "neg_ids": pa.array(cols["neg_ids"], pa.list_(pa.string())),
            "negs": pa.array([[doc_text[d] for d in n] for n in cols["neg_ids"]], pa.list_(pa.string())),
            "neg_scores": pa.array(cols["neg_scores"], pa.list_(pa.float32())),
            "neg_ranks": pa.array(cols["neg_ranks"], pa.list_(pa.int32())),
            "topic": pa.array(df["topic"].to_list(), pa.int32()),
            "known_pos_ids": pa.array(df["known_pos_ids"].to_list(), pa.list_(pa.string())),
        },
        schema=schema.SHARD,
    )
    return table, stats
