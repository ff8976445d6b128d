"""After mining, before curation: a targeted false-negative check, teacher rescoring, and the
mining-quality report. Pure functions over the mined table (MINED schema) and text lookups.

False-negative check (``fncheck``). Only kept negatives in the uncertain band are judged, those with
    band_lo * s(q, pos) <= s(q, neg) <= band_hi * s(q, pos)     (s: miner score, s(q, pos) > 0)
by a stronger scorer t; the negative is confirmed relevant when
    t(q, neg) >= t(q, pos) - confirm_margin.
A confirmed (q, doc) leaves the negatives of every row of q (the funnel counts it as
``confirmed_false_negative``) and is either forbidden for q (``action: drop``; the trainer masks
it) or added to q's known positives (``action: relabel``; the row's known_pos_ids, which the
multi-positive loss takes as extra targets). The share of the band confirmed estimates the false-
negative rate among the hardest kept negatives.

Teacher rescoring (``teacher``) replaces pos_score and neg_scores with the teacher's scores.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import polars as pl
import pyarrow as pa

from curate import schema
from curate.config import Config, FnCheckConfig
from curate.mine import scorer
from curate.records import Known

log = logging.getLogger(__name__)



def resolve_scorers(cfg: Config) -> None:
    """Check the configured scorer folders before any work starts (errors name the key)."""
    for key, sec in (("fncheck", cfg.fncheck), ("teacher", cfg.teacher)):
        if sec.scorer is not None:
            scorer.resolve(sec.scorer, sec.kind, f"{key}.scorer")


def band_entries(mined: pl.DataFrame, band: tuple[float, float]) -> pl.DataFrame:
    """One row per kept negative in the uncertain band: (query_id, pos_id, neg_id, neg_score)."""
    lo, hi = band
    return (
        mined.select("query_id", "pos_id", "pos_score", "neg_ids", "neg_scores")
        .explode("neg_ids", "neg_scores")
        .drop_nulls("neg_ids")
        .filter(
            (pl.col("pos_score") > 0)
            & (pl.col("neg_scores") >= lo * pl.col("pos_score"))
            & (pl.col("neg_scores") <= hi * pl.col("pos_score"))
        )
        .rename({"neg_ids": "neg_id", "neg_scores": "neg_score"})
    )


def confirm(entries: pl.DataFrame, pair_scores, margin: float) -> pl.DataFrame:
    """``entries`` with teacher scores and a ``confirmed`` column."""
    q = entries["query_id"].to_list()
    t_neg = pair_scores(list(zip(q, entries["neg_id"].to_list(), strict=True)))
    t_pos = pair_scores(list(zip(q, entries["pos_id"].to_list(), strict=True)))
    return entries.with_columns(
        pl.Series("t_neg", t_neg, pl.Float32),
        pl.Series("t_pos", t_pos, pl.Float32),
        pl.Series("confirmed", t_neg >= t_pos - margin, pl.Boolean),
    )


def remove_negatives(mined: pl.DataFrame, pairs: set[tuple[str, str]]) -> tuple[pl.DataFrame, int]:
    """Drop negative d from every row of query q for each (q, d) in ``pairs``;
    -> (table, removed)."""
    queries = {q for q, _ in pairs}
    keep, removed = [], 0
    for q, ids in mined.select("query_id", "neg_ids").iter_rows():
        keep.append([j for j, d in enumerate(ids) if q not in queries or (q, d) not in pairs])
        removed += len(ids) - len(keep[-1])
    return schema.keep_negatives(mined, keep), removed


def check_false_negatives(mined: pl.DataFrame, pair_scores, cfg: FnCheckConfig):
    """-> (mined without confirmed negatives, confirmed [query_id, doc_id, score], report)."""
    judged = confirm(band_entries(mined, cfg.band), pair_scores, cfg.confirm_margin)
    hits = judged.filter("confirmed")
    confirmed = (
        hits.group_by("query_id", "neg_id", maintain_order=True)
        .agg(pl.col("neg_score").max().alias("score"))
        .rename({"neg_id": "doc_id"})
        .sort("query_id", "doc_id")
    )
    out, removed = remove_negatives(mined, set(confirmed.select("query_id", "doc_id").iter_rows()))
    report = {
        "scorer": pair_scores.scorer.name,
        "kind": cfg.kind,
        "action": cfg.action,
        "band": list(cfg.band),
        "confirm_margin": cfg.confirm_margin,
        "checked": judged.height,  # kept negatives (row entries) in the band
        "checked_pairs": judged.select("query_id", "neg_id").n_unique() if judged.height else 0,
        "confirmed": hits.height,
        "confirmed_pairs": confirmed.height,
        "dropped": confirmed.height if cfg.action == "drop" else 0,
        "relabelled": confirmed.height if cfg.action == "relabel" else 0,
        "negatives_removed": removed,
    }
    return out, confirmed, report


def rescore(mined: pl.DataFrame, pair_scores) -> pl.DataFrame:
    """pos_score and neg_scores from the teacher, one score per (query, doc) pair."""
    q = mined["query_id"].to_list()
    pos = pair_scores(list(zip(q, mined["pos_id"].to_list(), strict=True)))
    flat = [(qq, d) for qq, ids in zip(q, mined["neg_ids"].to_list(), strict=True) for d in ids]
    neg = pair_scores(flat).tolist()
    lists, start = [], 0
    for ids in mined["neg_ids"].to_list():
        lists.append(neg[start : start + len(ids)])
        start += len(ids)
    return mined.with_columns(
        pl.Series("pos_score", pos, pl.Float32),
        pl.Series("neg_scores", lists, pl.List(pl.Float32)),
    )


def mining_quality(mined: pl.DataFrame, funnel: Counter, check: dict | None) -> dict:
    """Per-run figures: positive - hardest kept negative (miner scores), each funnel reason's
    share of the candidates, and the estimated false-negative rate of the uncertain band."""
    gap = (mined["pos_score"] - mined["neg_scores"].list.max()).drop_nulls()
    cand = max(funnel.get("candidates", 0), 1)
    checked = check["checked"] if check else None
    return {
        "score_source": "miner",
        "pairs": mined.height,
        "pairs_without_negatives": mined.height - len(gap),
        "gap_pos_minus_hardest_neg": {
            "mean": round(float(gap.mean()), 5) if len(gap) else None,
            "median": round(float(gap.median()), 5) if len(gap) else None,
        },
        "skip_rates": {
            r: round(n / cand, 5)
            for r, n in sorted(funnel.items())
            if r not in ("candidates", "kept")
        },
        "kept_rate": round(funnel.get("kept", 0) / cand, 5),
        "uncertain_band_checked": checked,
        "uncertain_band_confirmed": check["confirmed"] if check else None,
        "est_false_negative_rate": (
            round(check["confirmed"] / checked, 5) if check and checked else None
        ),
    }


def _forbid(forbidden: pa.Table, confirmed: pl.DataFrame) -> pa.Table:
    """Forbidden rows plus the confirmed pairs not already in them."""
    have = set(zip(*(forbidden.column(c).to_pylist() for c in ("query_id", "doc_id")), strict=True))
    new = [(q, d, s) for q, d, s in confirmed.iter_rows() if (q, d) not in have]
    if not new:
        return forbidden
    rows = pa.table(
        {
            "query_id": [q for q, _, _ in new],
            "doc_id": [d for _, d, _ in new],
            "reason": [schema.CONFIRMED_FALSE_NEGATIVE] * len(new),
            "score": pa.array([s for _, _, s in new], pa.float32()),
        },
        schema=schema.FORBIDDEN,
    )
    return pa.concat_tables([forbidden, rows])


def _act(cfg: FnCheckConfig, confirmed, check: dict, forbidden, funnel: Counter, known: Known):
    """Count the removed negatives in the funnel; forbid (drop) or relabel the confirmed pairs
    -> (forbidden, known positives with the relabelled pairs added)."""
    if check["negatives_removed"]:
        funnel["kept"] -= check["negatives_removed"]
        funnel[schema.CONFIRMED_FALSE_NEGATIVE] += check["negatives_removed"]
    log.info("fncheck: %s", check)
    if cfg.action == "drop":
        return _forbid(forbidden, confirmed), known
    return forbidden, known.plus(confirmed)


def apply(
    cfg: Config,
    mined: pa.Table,
    forbidden: pa.Table,
    funnel: Counter,
    known: Mapping[str, list[str]],
    query_text: Mapping[str, str],
    doc_text: Mapping[str, str],
    cache_dir: Path | None = None,
):
    """fncheck, mining quality, then teacher rescoring -> (mined, forbidden, known, manifest
    sections). ``funnel`` is updated in place (kept -> confirmed_false_negative); an embedder
    scorer keeps its embeddings in ``cache_dir`` for the next run."""
    device = cfg.embed.device
    loaded: dict[tuple, scorer.PairScores] = {}

    def scores_for(sec, key: str) -> scorer.PairScores:
        spec = (sec.scorer, sec.kind, sec.max_length)
        if spec not in loaded:
            model = scorer.load(sec.scorer, sec.kind, sec.max_length, key, device, cache_dir)
            loaded[spec] = scorer.PairScores(model, query_text, doc_text)
        return loaded[spec]

    # Without a check or a teacher only the scores are read: the mined table can be a memory-
    # mapped file whose id columns (most of its bytes) the driver never touches.
    table, check, known = None, None, Known.of(known)
    if cfg.fncheck.scorer is not None:
        table = pl.from_arrow(mined)
        pair_scores = scores_for(cfg.fncheck, "fncheck.scorer")
        table, confirmed, check = check_false_negatives(table, pair_scores, cfg.fncheck)
        forbidden, known = _act(cfg.fncheck, confirmed, check, forbidden, funnel, known)
    scores = pl.from_arrow(mined.select(["pos_score", "neg_scores"])) if table is None else table
    quality = mining_quality(scores, funnel, check)
    source = {"source": "miner", "model": cfg.embed.model, "kind": "embedder"}
    if cfg.teacher.scorer is not None:
        table = rescore(pl.from_arrow(mined) if table is None else table,
                        scores_for(cfg.teacher, "teacher.scorer"))
        source = {"source": "teacher", "model": cfg.teacher.scorer, "kind": cfg.teacher.kind}
    sections = {
        "fncheck": check or {"enabled": False},
        "score_source": source,
        "mining_quality": quality,
    }
    if check is None and cfg.teacher.scorer is None:
        return mined, forbidden, known, sections
    return table.to_arrow().cast(schema.MINED), forbidden, known, sections
