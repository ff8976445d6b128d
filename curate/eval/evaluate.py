"""Stage 7: retrieval quality of a model on a held-out split (exact search over the corpus)."""

from __future__ import annotations

import numpy as np
import polars as pl

from curate.config import IndexConfig
from curate.eval.metrics import evaluate_run
from curate.index import build as index


def qrels_dict(qrels: pl.DataFrame) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for q, d, s in qrels.select("query_id", "doc_id", "score").iter_rows():
        if s > 0:
            out.setdefault(q, {})[d] = float(s)
    return out


def evaluate(
    query_ids: list[str],
    query_vecs: np.ndarray,
    doc_ids: list[str],
    doc_vecs: np.ndarray,
    qrels: pl.DataFrame,
    k: int = 100,
) -> dict[str, float]:
    """nDCG@10, Recall@100, MRR@10 of exact inner-product retrieval."""
    flat = index.build_index(doc_vecs, IndexConfig(factory="Flat"))
    _, I = index.search(flat, query_vecs, k)
    run = {q: [doc_ids[j] for j in row if j >= 0] for q, row in zip(query_ids, I)}
    return evaluate_run(run, qrels_dict(qrels))
