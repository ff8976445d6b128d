"""Table schemas shared by the stages: one place that says what each artifact holds."""

from __future__ import annotations

import pyarrow as pa

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
    """Raise if ``table`` does not carry ``schema``'s columns with their types (internal invariant)."""
    for f in schema:
        if f.name not in table.column_names:
            raise ValueError(f"{name}: column {f.name!r} missing; has {table.column_names}")
        got = table.schema.field(f.name).type
        if got != f.type:
            raise ValueError(f"{name}: column {f.name!r} is {got}, expected {f.type}")
