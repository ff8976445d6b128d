"""Exact deduplication: documents with the same normalised text become one canonical id."""

from __future__ import annotations

import polars as pl

from curate.text import text_hash


def add_text_hash(corpus: pl.DataFrame) -> pl.DataFrame:
    """Adds ``hash``: of title + text, normalised, so case/punctuation variants collide."""
    joined = (corpus["title"] + " " + corpus["text"]).to_list()
    return corpus.with_columns(pl.Series("hash", [text_hash(t) for t in joined], pl.String))


def canonical_ids(corpus: pl.DataFrame) -> pl.DataFrame:
    """doc_id -> canonical_id, the smallest doc_id sharing its text hash (order-independent).

    ``corpus`` must carry ``hash`` (see ``add_text_hash``)."""
    return corpus.select(
        "doc_id", pl.col("doc_id").min().over("hash").alias("canonical_id")
    ).sort("doc_id")


def remap(ids: list[str], canon: dict[str, str]) -> list[str]:
    """Map ids to canonical ids, keeping the first occurrence of each."""
    out, seen = [], set()
    for i in ids:
        c = canon.get(i, i)
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out
