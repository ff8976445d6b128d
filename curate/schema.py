"""Table schemas shared by the stages: one place that says what each artifact holds."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa

if TYPE_CHECKING:
    import polars as pl

# Stage 1: validated inputs (polars frames with exactly these columns).
CORPUS = pa.schema([("doc_id", pa.string()), ("title", pa.string()), ("text", pa.string())])
QUERIES = pa.schema([("query_id", pa.string()), ("text", pa.string())])
QRELS = pa.schema([("query_id", pa.string()), ("doc_id", pa.string()), ("score", pa.float64())])


def embeddings(dim: int, dtype: str = "float32") -> pa.Schema:
    """Stage 2: one row per text, the vector as a fixed-size list keyed by id."""
    value = pa.float16() if dtype == "float16" else pa.float32()
    return pa.schema([("id", pa.string()), ("embedding", pa.list_(value, dim))])


# Stage 4: one row per training pair (query, positive) with its kept negatives.
MINED = pa.schema(
    [
        ("query_id", pa.string()),
        ("pos_id", pa.string()),
        ("pos_score", pa.float32()),
        ("neg_ids", pa.list_(pa.string())),
        ("neg_scores", pa.list_(pa.float32())),
        ("neg_ranks", pa.list_(pa.int32())),
    ]
)
# Why a mined candidate was dropped: the funnel's keys and forbidden.parquet's ``reason``. The
# first group is forbidden for the query (likely false negatives, masked in training).
FALSE_NEGATIVE_REASONS = (
    "known_positive",
    "duplicate_of_positive",
    "near_duplicate",
    "above_ceiling",
    "ngram_duplicate",
)
CONFIRMED_FALSE_NEGATIVE = "confirmed_false_negative"  # by the false-negative check (fncheck)
FORBIDDEN_REASONS = (*FALSE_NEGATIVE_REASONS, CONFIRMED_FALSE_NEGATIVE)
OTHER_REASONS = ("out_of_window", "not_selected", "spare")  # not forbidden: only not kept

# The negatives of a row: entry j of each list is one negative (id, score, rank); a filter keeps
# them aligned through ``keep_negatives`` (the batch stage, on doc numbers, cuts the scores and
# ranks by the same flat positions: curate.batch.curation.build_rows).
NEGATIVES = ("neg_ids", "neg_scores", "neg_ranks")


def keep_negatives(frame: pl.DataFrame, keep: list[list[int]]) -> pl.DataFrame:
    """``frame`` with each row's negatives cut to the positions ``keep[row]`` (in that order),
    the three lists alike."""
    import polars as pl  # here: the schemas alone load without it (the GPU image has none)

    types = (pl.List(pl.String), pl.List(pl.Float32), pl.List(pl.Int32))
    cut: dict[str, list] = {name: [] for name in NEGATIVES}
    for row, picks in zip(frame.select(*NEGATIVES).iter_rows(), keep, strict=True):
        for name, values in zip(NEGATIVES, row, strict=True):
            cut[name].append([values[j] for j in picks])
    return frame.with_columns(pl.Series(n, cut[n], t) for n, t in zip(NEGATIVES, types))

# Candidates rejected as likely false negatives; the trainer's mask obeys them.
FORBIDDEN = pa.schema(
    [
        ("query_id", pa.string()),
        ("doc_id", pa.string()),
        ("reason", pa.string()),
        ("score", pa.float32()),  # the query-candidate score at mining time
    ]
)

# Stage 5: the shards handed to trainers. Rows of one batch are contiguous and one row group.
SHARD = pa.schema(
    [
        ("batch_id", pa.int64()),
        ("query_id", pa.string()),
        ("query", pa.string()),
        ("pos_id", pa.string()),
        ("pos", pa.string()),
        ("pos_score", pa.float32()),
        ("neg_ids", pa.list_(pa.string())),
        ("negs", pa.list_(pa.string())),
        ("neg_scores", pa.list_(pa.float32())),
        ("neg_ranks", pa.list_(pa.int32())),
        ("topic", pa.int32()),
        ("known_pos_ids", pa.list_(pa.string())),
    ]
)


def check(table: pa.Table, schema: pa.Schema, name: str) -> None:
    """Raise if ``table`` does not carry ``schema``'s columns with their types (an internal
    invariant)."""
    for f in schema:
        if f.name not in table.column_names:
            raise ValueError(f"{name}: column {f.name!r} missing; has {table.column_names}")
        got = table.schema.field(f.name).type
        if got != f.type:
            raise ValueError(f"{name}: column {f.name!r} is {got}, expected {f.type}")
