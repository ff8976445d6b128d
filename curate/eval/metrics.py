"""Retrieval metrics over a ranked run and graded qrels: nDCG@k, Recall@k, MRR@k.

Definitions follow trec_eval as used by BEIR (pytrec_eval):

- nDCG@k = DCG@k / IDCG@k with DCG@k = sum_{r=1..k} rel(d_r) / log2(r + 1), gain = the graded
  score itself; IDCG@k is the DCG of the qrels scores sorted descending.
- Recall@k = |relevant in top k| / |relevant|.
- MRR@k = 1 / rank of the first relevant document within the top k, else 0.

A document is relevant when its qrels score is > 0. Means are taken over the queries that have at
least one relevant document; such a query that is missing from the run scores 0 on every metric.
Queries that appear only in the run are ignored.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

# The headline metrics, as ``evaluate_run`` names them at its default k (report, loop).
METRICS = ("ndcg@10", "recall@100", "mrr@10")

log = logging.getLogger(__name__)


def _dedupe(ranked: Sequence[str]) -> list[str]:
    # A doc listed twice must not earn its gain twice, or nDCG could exceed 1.
    seen: dict[str, None] = {}
    for doc_id in ranked:
        seen.setdefault(doc_id, None)
    return list(seen)


def dcg(gains: Sequence[float]) -> float:
    """Discounted cumulative gain of gains in rank order (rank 1 first)."""
    return sum(g / math.log2(r + 1) for r, g in enumerate(gains, start=1))


def query_metrics(
    ranked: Sequence[str], rels: Mapping[str, float], k_ndcg: int, k_recall: int, k_mrr: int
) -> dict[str, float]:
    """Metrics of one query; ``rels`` holds only documents with score > 0."""
    ranked = _dedupe(ranked)
    ideal = dcg(sorted(rels.values(), reverse=True)[:k_ndcg])
    ndcg = dcg([rels.get(d, 0.0) for d in ranked[:k_ndcg]]) / ideal
    recall = sum(d in rels for d in ranked[:k_recall]) / len(rels)
    first = next((r for r, d in enumerate(ranked[:k_mrr], start=1) if d in rels), None)
    return {
        f"ndcg@{k_ndcg}": ndcg,
        f"recall@{k_recall}": recall,
        f"mrr@{k_mrr}": 1.0 / first if first else 0.0,
    }


def evaluate_run(
    run: Mapping[str, Sequence[str]],
    qrels: Mapping[str, Mapping[str, float]],
    k_ndcg: int = 10,
    k_recall: int = 100,
    k_mrr: int = 10,
    per_query: bool = False,
) -> dict[str, float] | dict[str, dict[str, float]]:
    """Score ``run`` (query id -> doc ids, best first) against ``qrels`` (query id -> {doc id:
    graded score}).

    Returns ``{"ndcg@10", "recall@100", "mrr@10", "queries"}`` (names follow the k arguments) as
    means over the judged queries, or with ``per_query=True`` query id -> that query's metrics.
    """
    for name, k in (("k_ndcg", k_ndcg), ("k_recall", k_recall), ("k_mrr", k_mrr)):
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"{name} must be a positive int, got {k!r}")
    judged = {
        q: {d: float(s) for d, s in sorted(docs.items()) if s > 0}
        for q, docs in sorted(qrels.items())
    }
    judged = {q: rels for q, rels in judged.items() if rels}
    if len(judged) < len(qrels):
        log.info(
            "%d of %d queries have no relevant doc; left out", len(qrels) - len(judged), len(qrels)
        )
    missing = sum(q not in run for q in judged)
    if missing:
        # Counted as 0 rather than dropped so a run that skips hard queries cannot look better.
        log.warning(
            "%d of %d judged queries are missing from the run; scored 0", missing, len(judged)
        )
    scores = {
        q: query_metrics(run.get(q, ()), rels, k_ndcg, k_recall, k_mrr)
        for q, rels in judged.items()
    }
    if per_query:
        return scores
    names = [f"ndcg@{k_ndcg}", f"recall@{k_recall}", f"mrr@{k_mrr}"]
    n = len(scores)
    out = {m: (sum(s[m] for s in scores.values()) / n if n else 0.0) for m in names}
    out["queries"] = n
    return out
