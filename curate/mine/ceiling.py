"""Choosing ``mine.max_relative`` from the data: a leave-one-out over the known positives.

The ceiling drops candidates scoring above max_relative x a known positive's score, because an
unlabelled relevant doc tends to score like the labelled ones. How high it may go depends on the
dataset: where a query's positives spread widely in score (Cranfield: ~7 per query), a relevant
doc often sits far below the best known one, and the default 0.95 lets it through as a negative.

So: hide each known positive of a query in turn, mine as the miner would with the others (same
search depth, window, ceiling reference and number of negatives), and count how often the hidden
one is chosen. Over many queries that is the false-negative rate a ceiling lets through on
relevant docs like the labelled ones; the largest ceiling whose rate is within the target wins.
Queries with a single positive say nothing about it, so a dataset without any keeps the ceiling
from the config. With ``mine.ceiling_over: trained`` the reference is taken, as the miner takes
it, from the positives of the query's training rows that are still visible.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from curate.config import MineConfig
from curate.index.recall import exact_search
from curate.mine.negatives import CEILING_FROM

log = logging.getLogger(__name__)

GRID = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))  # 1.00, 0.95, ... 0.50


@dataclass(frozen=True)
class Calibration:
    max_relative: float | None  # the chosen ceiling (the config's when nothing could be measured)
    queries: int  # queries with two or more known positives that took part
    held_out: int  # positives hidden in turn
    fn_rate: dict[str, float] = field(default_factory=dict)  # "0.95" -> estimated FN rate
    negatives: dict[str, int] = field(default_factory=dict)  # "0.95" -> negatives mined


def leave_one_out(
    doc_vecs: np.ndarray,
    query_vecs: np.ndarray,
    known: list[np.ndarray],
    cfg: MineConfig,
    trained: list[np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """-> (hidden positives chosen, negatives chosen) per ceiling in GRID, and how many positives
    were hidden. ``known[i]``: doc rows of query i's known positives (two or more each);
    ``trained[i]``: those of its training rows, the reference's pool when given (a hiding that
    leaves none visible takes no part). Exact search, so the estimate does not depend on the
    index's approximation."""
    grid = np.array(GRID)[:, None]  # [G, 1]
    n = cfg.num_negatives
    fn, negs, held = np.zeros(len(GRID)), np.zeros(len(GRID)), 0
    scores, cands = exact_search(doc_vecs, query_vecs, cfg.top_k)
    ranks = np.arange(scores.shape[1])
    window = (ranks >= cfg.range_min) & (ranks < cfg.range_max)
    for qi, pos in enumerate(known):
        pool = pos if trained is None else np.asarray(trained[qi])
        pool_scores = doc_vecs[pool] @ query_vecs[qi]
        for h, hidden in enumerate(pos):
            visible = np.delete(pos, h)
            ref_scores = pool_scores[pool != hidden]
            if not len(ref_scores):
                continue  # the miner would have no row of this query to take a reference from
            ref = float(CEILING_FROM[cfg.ceiling_from](ref_scores))
            keep = window & (cands[qi] >= 0) & ~np.isin(cands[qi], visible)
            s, is_hidden = scores[qi][keep], cands[qi][keep] == hidden
            eligible = s[None, :] <= grid * ref  # [G, C]: the miner drops score > ceiling
            taken = eligible.sum(1)
            negs += np.minimum(taken, n)
            held += 1
            if not is_hidden.any():
                continue  # the hidden positive is beyond the search depth or the window
            at = int(np.flatnonzero(is_hidden)[0])
            if cfg.strategy == "top":  # the first n eligible candidates in rank order
                fn += eligible[:, at] & (np.cumsum(eligible, 1)[:, at] <= n)
            else:  # n drawn at random from the eligible: chosen with probability n / eligible
                fn += eligible[:, at] * np.minimum(n / np.maximum(taken, 1), 1.0)
    return fn, negs, held


def calibrate(
    doc_vecs: np.ndarray,
    query_vecs: np.ndarray,
    known: list[np.ndarray],
    cfg: MineConfig,
    target: float,
    seed: int,
    max_queries: int = 1000,
    trained: list[np.ndarray] | None = None,
) -> Calibration:
    """The largest ceiling in GRID whose leave-one-out false-negative rate is <= ``target``
    (the lowest in GRID when none is). ``known[i]``: doc rows of query i's known positives;
    queries with fewer than two take no part, and at most ``max_queries`` are drawn.
    ``trained[i]``: doc rows of query i's training-row positives, given when the ceiling's
    reference comes from them (``mine.ceiling_over: trained``)."""
    multi = [i for i, pos in enumerate(known) if len(pos) >= 2]
    if not multi:
        log.info("ceiling calibration: no query has two known positives; max_relative stays %s",
                 cfg.max_relative)
        return Calibration(cfg.max_relative, 0, 0)
    if len(multi) > max_queries:
        multi = sorted(np.random.default_rng(seed).choice(multi, max_queries, replace=False))
    fn, negs, held = leave_one_out(
        doc_vecs, query_vecs[multi], [np.asarray(known[i]) for i in multi], cfg,
        None if trained is None else [np.asarray(trained[i]) for i in multi],
    )
    if not held:
        log.info("ceiling calibration: no hiding leaves a training-row positive as reference; "
                 "max_relative stays %s", cfg.max_relative)
        return Calibration(cfg.max_relative, 0, 0)
    rate = fn / np.maximum(negs, 1)
    ok = [c for c, r, m in zip(GRID, rate, negs, strict=True) if r <= target and m > 0]
    chosen = max(ok) if ok else GRID[-1]
    if not ok:
        log.warning("ceiling calibration: no ceiling down to %.2f keeps the estimated FN rate "
                    "<= %.2f%% (%.2f%% there); using %.2f", GRID[-1], 100 * target,
                    100 * rate[-1], GRID[-1])
    log.info("ceiling calibration: max_relative %.2f (estimated FN rate %.2f%%, %d queries, %d "
             "positives held out)", chosen, 100 * rate[GRID.index(chosen)], len(multi), held)
    return Calibration(
        chosen, len(multi), held,
        {f"{c:.2f}": round(float(r), 5) for c, r in zip(GRID, rate, strict=True)},
        {f"{c:.2f}": int(m) for c, m in zip(GRID, negs, strict=True)},
    )
