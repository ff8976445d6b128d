"""mine_block on a hand-built corpus: one test per funnel reason, the exact funnel, forbidden rows,
seeded random selection and partition independence.

Corpus (8 docs, 4 dims, unit vectors):
  d0 = e0                 positive of q0 (pair A)
  d1 = e1                 the other known positive of q0 (pair B)
  d2 = e2                 exact duplicate of d0 by text hash ("h0"), vector unrelated
  d3 = (0.99, s, 0, 0)    near-duplicate of d0: cos(d3, d0) = 0.99
  d4..d7                  ordinary docs in the e2/e3 plane, cos 0 to d0 and d1
q0 = (0.8, 0.6, 0, 0): score(q0, d0) = 0.8, score(q0, d1) = 0.6.
q1 = e3, positive d5: score 1.0 (only used where a second query is needed).
Candidate scores are written by hand, as the index would return them (best first).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from curate.config import MineConfig
from curate.mine.negatives import PairBlock, mine_block
from curate.schema import FALSE_NEGATIVE_REASONS

S = math.sqrt(1 - 0.99**2)
DOCS = np.array(
    [
        [1, 0, 0, 0],
        [0, 1, 0, 0],
        [0, 0, 1, 0],
        [0.99, S, 0, 0],
        [0, 0, 1, 0],
        [0, 0, 0, 1],
        [0, 0, 0.6, 0.8],
        [0, 0, 0.8, -0.6],
    ],
    dtype=np.float32,
)
HASH = np.array(["h0", "h1", "h0", "h3", "h4", "h5", "h6", "h7"])
Q0 = [0.8, 0.6, 0, 0]
Q1 = [0, 0, 0, 1]


def cfg(**kw) -> MineConfig:
    """Every rule off except the ones a test turns on (known positives always apply)."""
    base = dict(
        num_negatives=10, range_min=0, range_max=100, max_relative=None,
        near_dup_threshold=0.98, strategy="top", spare_negatives=0, ceiling_from="best",
    )  # fmt: skip
    return MineConfig(**{**base, **kw})


def q0_block(pos: list[int] = (0,)) -> PairBlock:
    """Query q0 with known positives {d0, d1}, one pair per entry of ``pos``."""
    return PairBlock(
        query_ids=["q0"],
        query_vecs=np.array([Q0], dtype=np.float32),
        pair_query=np.zeros(len(pos), dtype=np.int64),
        pair_pos=np.array(pos, dtype=np.int64),
        known=[np.array([0, 1])],
        pos_ids=[f"d{p}" for p in pos],
    )


def search_result(*rows: list[tuple[int, float]]) -> tuple[np.ndarray, np.ndarray]:
    """[(doc, score), ...] per query -> (scores [Q, k], cands [Q, k]), padded with -1 hits."""
    k = max(len(r) for r in rows)
    scores = np.full((len(rows), k), -np.inf, dtype=np.float32)
    cands = np.full((len(rows), k), -1, dtype=np.int64)
    for q, row in enumerate(rows):
        for j, (doc, score) in enumerate(row):
            cands[q, j], scores[q, j] = doc, score
    return scores, cands


def mine(block, hits, config, seed=0, doc_hash=HASH):
    scores, cands = hits
    return mine_block(block, scores, cands, DOCS, doc_hash, config, seed)


def negs(res, p=0) -> list[int]:
    return res.neg_docs[p].tolist()


def test_known_positives_never_negatives_including_other_pairs_positive():
    # Pair A (q0, d0) and pair B (q0, d1): each pair's own positive and the other's are rejected.
    hits = search_result([(1, 0.9), (0, 0.8), (4, 0.5), (5, 0.4)])
    res = mine(q0_block([0, 1]), hits, cfg())
    assert negs(res, 0) == [4, 5]
    assert negs(res, 1) == [4, 5]
    assert res.funnel == {"candidates": 8, "known_positive": 4, "kept": 4}
    # One forbidden row per (query, doc), not per pair.
    assert res.forbidden == [(0, 1, "known_positive"), (0, 0, "known_positive")]
    assert res.forbidden_scores == pytest.approx([0.9, 0.8])


def test_exact_duplicate_of_positive_dropped_by_hash():
    hits = search_result([(2, 0.7), (4, 0.5)])
    res = mine(q0_block(), hits, cfg())
    assert negs(res) == [4]
    assert res.funnel == {"candidates": 2, "duplicate_of_positive": 1, "kept": 1}
    assert res.forbidden == [(0, 2, "duplicate_of_positive")]
    # The hash alone decides: give d2 its own hash and it is an ordinary negative.
    res = mine(q0_block(), hits, cfg(), doc_hash=np.array([f"u{i}" for i in range(8)]))
    assert negs(res) == [2, 4]
    assert res.forbidden == []


def test_near_duplicate_of_positive_dropped_above_threshold():
    hits = search_result([(3, 0.7), (4, 0.5)])
    res = mine(q0_block(), hits, cfg(near_dup_threshold=0.98))  # cos(d3, d0) = 0.99 > 0.98
    assert negs(res) == [4]
    assert res.funnel == {"candidates": 2, "near_duplicate": 1, "kept": 1}
    assert res.forbidden == [(0, 3, "near_duplicate")]
    res = mine(q0_block(), hits, cfg(near_dup_threshold=0.995))  # 0.99 <= 0.995: kept
    assert negs(res) == [3, 4]
    assert res.forbidden == []


def test_near_duplicate_of_another_known_positive():
    # d3 is close to d0, which is not pair B's positive but is a known positive of q0.
    hits = search_result([(3, 0.5), (4, 0.4)])
    res = mine(q0_block([1]), hits, cfg())
    assert negs(res) == [4]
    assert res.forbidden == [(0, 3, "near_duplicate")]


def test_ceiling_relative_to_positive_score():
    # The best known positive of q0 (d0, 0.8) sets the ceiling for every pair of q0:
    # max_relative 0.95 -> ceiling 0.76: 0.79 is above, 0.70 is not, for pair A and pair B alike.
    hits = search_result([(4, 0.79), (5, 0.70)])
    for pos in ([0], [1]):
        res = mine(q0_block(pos), hits, cfg(max_relative=0.95))
        assert negs(res) == [5]
        assert res.funnel == {"candidates": 2, "above_ceiling": 1, "kept": 1}
        assert res.forbidden == [(0, 4, "above_ceiling")]
    assert res.pos_score.tolist() == pytest.approx([0.6])
    # max_relative 0.85 -> ceiling 0.68: both are above it.
    res = mine(q0_block(), hits, cfg(max_relative=0.85))
    assert negs(res) == []
    assert res.funnel["above_ceiling"] == 2


@pytest.mark.parametrize(
    "frm, ceiling, kept",
    [("best", 0.95 * 0.8, [5, 6]), ("median", 0.95 * 0.7, [6]), ("weakest", 0.95 * 0.6, [])],
)
def test_ceiling_from_best_median_or_weakest_positive(frm, ceiling, kept):
    # q0's known positives score 0.8 (d0) and 0.6 (d1); the same ceiling for both pairs.
    hits = search_result([(4, 0.79), (5, 0.70), (6, 0.6)])
    for pos in ([0], [1]):
        res = mine(q0_block(pos), hits, cfg(max_relative=0.95, ceiling_from=frm))
        assert negs(res) == kept, ceiling
        assert res.funnel["above_ceiling"] == 3 - len(kept)


def test_ceiling_over_trained_positives_ignores_known_positives_without_a_row():
    # q0 knows d0 (0.8) and d1 (0.6) but trains only (q0, d0): "trained" takes the weakest of
    # its rows (0.8 -> ceiling 0.76), "known" the weakest known (0.6 -> 0.57). d1 stays known.
    hits = search_result([(1, 0.9), (4, 0.75), (5, 0.70), (6, 0.5)])
    res = mine(q0_block([0]), hits, cfg(max_relative=0.95, ceiling_from="weakest",
                                        ceiling_over="trained"))  # fmt: skip
    assert negs(res) == [4, 5, 6]
    assert (0, 1, "known_positive") in res.forbidden
    res = mine(q0_block([0]), hits, cfg(max_relative=0.95, ceiling_from="weakest"))
    assert negs(res) == [6]
    # Both pairs trained: the weakest row is d1 again.
    res = mine(q0_block([0, 1]), hits, cfg(max_relative=0.95, ceiling_from="weakest",
                                           ceiling_over="trained"))  # fmt: skip
    assert negs(res, 0) == negs(res, 1) == [6]


def test_ceiling_disabled_by_none():
    hits = search_result([(4, 0.79), (5, 0.70)])
    res = mine(q0_block(), hits, cfg(max_relative=None))
    assert negs(res) == [4, 5]
    assert res.funnel == {"candidates": 2, "kept": 2}
    assert res.forbidden == []


def test_rank_window_uses_retrieval_rank():
    # Rank 0 is the positive itself; the window [1, 3) keeps ranks 1 and 2 only.
    hits = search_result([(0, 0.8), (4, 0.5), (5, 0.4), (6, 0.3), (7, 0.2)])
    res = mine(q0_block(), hits, cfg(range_min=1, range_max=3))
    assert negs(res) == [4, 5]
    assert res.neg_ranks[0].tolist() == [1, 2]
    assert res.funnel == {"candidates": 5, "known_positive": 1, "out_of_window": 2, "kept": 2}
    # Out of window is not a false-negative reason: no forbidden rows for d6, d7.
    assert res.forbidden == [(0, 0, "known_positive")]


def test_num_negatives_cap_marks_rest_not_selected():
    hits = search_result([(4, 0.5), (5, 0.4), (6, 0.3), (7, 0.2)])
    res = mine(q0_block(), hits, cfg(num_negatives=2))
    assert negs(res) == [4, 5]
    assert res.funnel == {"candidates": 4, "kept": 2, "not_selected": 2}
    assert res.forbidden == []


def test_spares_follow_the_kept_negatives_in_preference_order():
    hits = search_result([(4, 0.5), (5, 0.4), (6, 0.3), (7, 0.2)])
    res = mine(q0_block(), hits, cfg(num_negatives=2, spare_negatives=1))
    assert negs(res) == [4, 5, 6]  # two to train on, then one backup
    assert res.funnel == {"candidates": 4, "kept": 2, "spare": 1, "not_selected": 1}
    few = mine(q0_block(), search_result([(4, 0.5)]), cfg(num_negatives=2, spare_negatives=3))
    assert negs(few) == [4] and few.funnel == {"candidates": 1, "kept": 1}


def test_random_spares_are_drawn_after_the_kept_ones():
    config = cfg(strategy="random", num_negatives=2, spare_negatives=1)
    for seed in range(10):
        picked = negs(mine(q0_block(), random_hits(), config, seed=seed))
        assert len(set(picked)) == 3 and set(picked) <= {4, 5, 6, 7}
        assert picked[:2] == sorted(picked[:2])  # the two to train on, in rank order


def test_missing_hits_are_not_candidates():
    hits = search_result([(4, 0.5), (5, 0.4)], [(5, 0.9), (6, 0.3), (7, 0.2), (4, 0.1)])
    block = two_query_block()
    res = mine(block, hits, cfg())
    # q0's row is padded with two -1 hits: they are neither counted nor returned.
    assert negs(res, 0) == [4, 5]
    assert res.funnel["candidates"] == 2 + 4


def full_funnel_hits():
    return search_result(
        [
            (1, 0.95),  # rank 0: other known positive      -> known_positive
            (4, 0.90),  # rank 1: 0.90 > ceiling 0.76         -> above_ceiling
            (0, 0.80),  # rank 2: the positive               -> known_positive
            (3, 0.79),  # rank 3: near dup (also > ceiling)  -> near_duplicate (checked first)
            (2, 0.70),  # rank 4: hash duplicate of d0       -> duplicate_of_positive
            (5, 0.60),  # rank 5: eligible                   -> kept
            (6, 0.50),  # rank 6: eligible                   -> not_selected
            (7, 0.40),  # rank 7: >= range_max               -> out_of_window
        ]
    )


def test_exact_funnel_and_forbidden_rows():
    config = cfg(num_negatives=1, range_max=7, max_relative=0.95)  # ceiling 0.95 x 0.8 = 0.76
    res = mine(q0_block(), full_funnel_hits(), config)
    assert res.funnel == {
        "candidates": 8,
        "known_positive": 2,
        "above_ceiling": 1,
        "near_duplicate": 1,
        "duplicate_of_positive": 1,
        "not_selected": 1,
        "out_of_window": 1,
        "kept": 1,
    }
    assert negs(res) == [5]
    assert res.forbidden == [
        (0, 1, "known_positive"),
        (0, 4, "above_ceiling"),
        (0, 0, "known_positive"),
        (0, 3, "near_duplicate"),
        (0, 2, "duplicate_of_positive"),
    ]
    assert res.forbidden_scores == pytest.approx([0.95, 0.90, 0.80, 0.79, 0.70])
    # The n-gram rule needs doc texts: tests/test_mine_quality.py checks it on Cranfield texts.
    assert {r for _, _, r in res.forbidden} == set(FALSE_NEGATIVE_REASONS) - {"ngram_duplicate"}


def test_kept_negatives_keep_score_and_rank():
    config = cfg(num_negatives=3, range_max=100, max_relative=0.95)  # ceiling 0.95 x 0.8 = 0.76
    res = mine(q0_block(), full_funnel_hits(), config)
    assert negs(res) == [5, 6, 7]
    assert res.neg_scores[0].tolist() == pytest.approx([0.60, 0.50, 0.40])
    assert res.neg_ranks[0].tolist() == [5, 6, 7]
    assert res.neg_scores[0].dtype == np.float32
    assert res.neg_ranks[0].dtype == np.int32


def random_hits():
    # Four eligible candidates and num_negatives=2 in the random tests: 6 possible picks.
    return search_result([(4, 0.5), (5, 0.4), (6, 0.3), (7, 0.2)])


def test_random_strategy_seeded():
    config = cfg(strategy="random", num_negatives=2)
    a = mine(q0_block(), random_hits(), config, seed=0)
    b = mine(q0_block(), random_hits(), config, seed=0)
    assert negs(a) == negs(b)
    picked = negs(a)
    assert len(picked) == 2 and set(picked) <= {4, 5, 6, 7}
    assert picked == sorted(picked)  # kept in rank order
    assert a.funnel == {"candidates": 4, "kept": 2, "not_selected": 2}
    others = [negs(mine(q0_block(), random_hits(), config, seed=s)) for s in range(1, 11)]
    assert any(o != picked for o in others)
    assert all(o == sorted(o) for o in others)


def test_random_strategy_never_picks_a_rejected_candidate():
    config = cfg(strategy="random", num_negatives=2, range_max=100, max_relative=0.95)
    for seed in range(10):
        res = mine(q0_block(), full_funnel_hits(), config, seed=seed)
        assert set(negs(res)) <= {5, 6, 7}
        assert len(negs(res)) == 2


def two_query_block() -> PairBlock:
    return PairBlock(
        query_ids=["q0", "q1"],
        query_vecs=np.array([Q0, Q1], dtype=np.float32),
        pair_query=np.array([0, 1]),
        pair_pos=np.array([0, 5]),
        known=[np.array([0, 1]), np.array([5])],
        pos_ids=["d0", "d5"],
    )


def test_partition_independence():
    """q1 mined alongside q0 (as query row 1) or alone (as row 0) gives the same result."""
    config = cfg(strategy="random", num_negatives=2)
    q0_hits = [(4, 0.5), (5, 0.4), (6, 0.3), (7, 0.2)]
    q1_hits = [(5, 1.0), (2, 0.6), (4, 0.5), (6, 0.4), (7, 0.3), (3, 0.1)]
    alone_block = PairBlock(
        query_ids=["q1"],
        query_vecs=np.array([Q1], dtype=np.float32),
        pair_query=np.array([0]),
        pair_pos=np.array([5]),
        known=[np.array([5])],
        pos_ids=["d5"],
    )
    picks = set()
    for seed in range(5):
        both = mine(two_query_block(), search_result(q0_hits, q1_hits), config, seed)
        alone = mine(alone_block, search_result(q1_hits), config, seed)
        assert negs(both, 1) == negs(alone, 0)
        assert both.neg_scores[1].tolist() == alone.neg_scores[0].tolist()
        assert both.neg_ranks[1].tolist() == alone.neg_ranks[0].tolist()
        assert both.pos_score[1] == alone.pos_score[0] == pytest.approx(1.0)
        assert [(d, r) for q, d, r in both.forbidden if q == 1] == [(5, "known_positive")]
        assert [(q, d, r) for q, d, r in alone.forbidden] == [(0, 5, "known_positive")]
        picks.add(tuple(negs(alone, 0)))
    assert len(picks) > 1  # the seed matters, so the equality above is not trivially true


def test_kept_negative_of_a_query_is_never_forbidden_for_it():
    # Per pair, pair A (pos d0, 0.8) would keep d4 at 0.70 under ceiling 0.76 while pair B
    # (pos d1, 0.6, ceiling 0.57) forbids it; the per-query ceiling (best positive) makes both
    # keep it.
    hits = search_result([(4, 0.70), (5, 0.50)])
    res = mine(q0_block([0, 1]), hits, cfg(max_relative=0.95))
    kept = {d for p in range(2) for d in negs(res, p)}
    forbidden = {d for _, d, _ in res.forbidden}
    assert kept & forbidden == set()


def test_pair_blocks_take_rows_by_join_and_keep_pair_order():
    """Ids to rows without a dict of every doc: pairs of a query need not be contiguous, and a
    block keeps its pairs in the order of the input."""
    import polars as pl

    from curate.mine.stage import pair_blocks
    from curate.records import Embedded

    emb = Embedded(["d0", "d1", "d2", "d3"], np.zeros((4, 2), np.float32), ["qa", "qb", "qc"],
                   np.zeros((3, 2), np.float32))  # fmt: skip
    assert isinstance(emb.doc_ids, pl.Series) and emb.doc_rows(["d3", "zz"]).tolist() == [3, -1]
    pairs = pl.DataFrame({"query_id": ["qc", "qa", "qc", "qb"], "doc_id": ["d2", "d0", "d3", "d1"]})
    known = {"qc": ["d3", "d2"], "qa": ["d0"], "qb": ["d1", "d0"]}
    first, second = pair_blocks(pairs, known, emb, size=2)
    assert list(first.query_ids) == ["qc", "qa"] and first.query_rows.tolist() == [2, 0]
    assert first.pair_query.tolist() == [0, 1, 0] and first.pair_pos.tolist() == [2, 0, 3]
    assert list(first.pos_ids) == ["d2", "d0", "d3"]
    assert [k.tolist() for k in first.known] == [[2, 3], [0]]
    assert first.known[-1].tolist() == [0] and len(first.known) == 2  # a sequence, as a list
    with pytest.raises(IndexError):
        first.known[2]
    assert list(second.query_ids) == ["qb"] and second.pair_query.tolist() == [0]
    assert second.pair_pos.tolist() == [1] and [k.tolist() for k in second.known] == [[0, 1]]
