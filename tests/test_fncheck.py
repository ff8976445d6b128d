"""The false-negative check and teacher rescoring: the band and the margin rule by hand with a
lookup scorer, then ``apply`` end to end with a real (tiny, random) cross-encoder on Cranfield."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from curate import schema
from curate.batch.curation import build_rows, known_table
from curate.config import config_from_dict
from curate.mine.fncheck import apply, band_entries, check_false_negatives, rescore
from curate.mine.scorer import PairScores, load


def mined_table(rows: list[tuple]) -> pl.DataFrame:
    """(query_id, pos_id, pos_score, [(neg_id, neg_score), ...]) -> a MINED frame."""
    return pl.from_arrow(
        pa.table(
            {
                "query_id": [r[0] for r in rows],
                "pos_id": [r[1] for r in rows],
                "pos_score": pa.array([r[2] for r in rows], pa.float32()),
                "neg_ids": [[n for n, _ in r[3]] for r in rows],
                "neg_scores": pa.array(
                    [[s for _, s in r[3]] for r in rows], pa.list_(pa.float32())
                ),
                "neg_ranks": pa.array(
                    [list(range(1, len(r[3]) + 1)) for r in rows], pa.list_(pa.int32())
                ),
            },
            schema=schema.MINED,
        )
    )


# Miner scores; band [0.85, 1.0] of the positive's score.
MINED = [
    ("q1", "d1", 0.8, [("d3", 0.78), ("d4", 0.70), ("d5", 0.50)]),  # d3 .975, d4 .875: in band
    ("q1", "d2", 0.6, [("d4", 0.70), ("d6", 0.55), ("d3", 0.30)]),  # d4 1.17 out, d6 .917 in
    ("q2", "d7", -0.1, [("d3", -0.2)]),  # the band is undefined for a positive scoring <= 0
    ("q2", "d8", 0.5, []),
]
TEACHER = {("q1", "d1"): 5.0, ("q1", "d3"): 4.95, ("q1", "d4"): 3.0, ("q1", "d2"): 2.0,
           ("q1", "d6"): 2.5, ("q1", "d5"): 0.0, ("q2", "d7"): 1.0, ("q2", "d3"): 1.0,
           ("q2", "d8"): 1.0}  # fmt: skip


class LookupScorer:
    """Teacher scores by (query text, doc text): texts are the ids here."""

    name = "lookup"

    def score(self, queries, docs):
        return np.array([TEACHER[p] for p in zip(queries, docs, strict=True)], np.float32)


def lookup_scores() -> PairScores:
    ids = {x: x for p in TEACHER for x in p}
    return PairScores(LookupScorer(), ids, ids)


def fn_cfg(**kw):
    return config_from_dict({"fncheck": {"scorer": "x", "confirm_margin": 0.1, **kw}}).fncheck


def test_band_holds_the_hardest_kept_negatives_only():
    got = band_entries(mined_table(MINED), (0.85, 1.0))
    assert got.select("query_id", "pos_id", "neg_id").rows() == [
        ("q1", "d1", "d3"),
        ("q1", "d1", "d4"),
        ("q1", "d2", "d6"),
    ]
    exact = mined_table([("q", "p", 0.5, [("a", 0.25), ("b", 0.5), ("c", 0.5000001)])])
    assert band_entries(exact, (0.5, 1.0))["neg_id"].to_list() == ["a", "b"]  # bounds included


def test_margin_rule_confirms_and_removes_from_every_row_of_the_query():
    out, confirmed, report = check_false_negatives(mined_table(MINED), lookup_scores(), fn_cfg())
    # d3: 4.95 >= 5.0 - 0.1 confirmed; d4: 3.0 < 4.9 not; d6: 2.5 >= 2.0 - 0.1 confirmed.
    assert confirmed.select("query_id", "doc_id").rows() == [("q1", "d3"), ("q1", "d6")]
    assert confirmed["score"].to_list() == pytest.approx([0.78, 0.55])
    assert out["neg_ids"].to_list() == [["d4", "d5"], ["d4"], ["d3"], []]  # q2 keeps its d3
    assert out["neg_scores"].to_list() == [pytest.approx([0.70, 0.50]), pytest.approx([0.70]),
                                           pytest.approx([-0.2]), []]  # fmt: skip
    assert out["neg_ranks"].to_list() == [[2, 3], [1], [1], []]
    assert out["pos_score"].to_list() == mined_table(MINED)["pos_score"].to_list()
    assert {k: report[k] for k in ("checked", "checked_pairs", "confirmed", "confirmed_pairs")} == {
        "checked": 3, "checked_pairs": 3, "confirmed": 2, "confirmed_pairs": 2
    }  # fmt: skip
    assert report["negatives_removed"] == 3  # d3 also leaves q1's other row, out of band there
    assert (report["dropped"], report["relabelled"]) == (2, 0)


def test_negative_margin_is_stricter():
    _, confirmed, report = check_false_negatives(
        mined_table(MINED), lookup_scores(), fn_cfg(confirm_margin=-0.2)
    )
    assert confirmed.select("query_id", "doc_id").rows() == [("q1", "d6")]  # 2.5 >= 2.2 only
    assert report["relabelled"] == 0 and report["confirmed"] == 1


def test_rescore_puts_teacher_scores_in_place():
    out = rescore(mined_table(MINED), lookup_scores())
    assert out["pos_score"].to_list() == [5.0, 2.0, 1.0, 1.0]
    want = [[4.95, 3.0, 0.0], [3.0, 2.5, 4.95], [1.0], []]
    assert out["neg_scores"].to_list() == [pytest.approx(w) for w in want]
    assert out["neg_ids"].to_list() == mined_table(MINED)["neg_ids"].to_list()


# --- apply, with a real cross-encoder on Cranfield ----------------------------------------


@pytest.fixture(scope="module")
def cran(cranfield):
    """Query 1 of Cranfield, its train positives, and 6 other docs as its 'negatives'."""
    qtext = {q["_id"]: q["text"] for q in map(json.loads, (cranfield / "queries.jsonl").open())}
    dtext = {d["_id"]: d["text"] for d in map(json.loads, (cranfield / "corpus.jsonl").open())}
    qrels = pl.read_csv(
        cranfield / "qrels" / "train.tsv",
        separator="\t",
        schema_overrides={"query-id": pl.String, "corpus-id": pl.String},
    )
    q = qrels["query-id"][0]
    pos = qrels.filter(pl.col("query-id") == q)["corpus-id"].to_list()[:2]
    negs = [d for d in list(dtext)[:40] if d not in pos][:6]
    rows = [(q, p, 0.8, [(n, 0.75) for n in negs[i::2]]) for i, p in enumerate(pos)]
    forbidden = pa.table(
        {
            "query_id": [q],
            "doc_id": [negs[0]],
            "reason": ["above_ceiling"],
            "score": pa.array([0.9], pa.float32()),
        },
        schema=schema.FORBIDDEN,
    )
    return q, pos, negs, mined_table(rows).to_arrow(), forbidden, qtext, dtext


def run_cfg(scorer, **fn):
    return config_from_dict(
        {
            "embed": {"device": "cpu"},
            "fncheck": {"scorer": str(scorer), "max_length": 64, **fn},
            "teacher": {"scorer": str(scorer), "max_length": 64},
        }  # fmt: skip
    )


def test_apply_drop_forbids_confirmed_and_rescores(cran, tiny_cross_encoder):
    q, pos, negs, mined, forbidden, qtext, dtext = cran
    funnel = Counter(candidates=20, kept=6, not_selected=14)
    cfg = run_cfg(tiny_cross_encoder, confirm_margin=1e6)  # every negative in band is confirmed
    out, forb, known, sections = apply(cfg, mined, forbidden, funnel, {q: pos}, qtext, dtext)
    assert out.schema == schema.MINED
    assert sum(len(n) for n in out.column("neg_ids").to_pylist()) == 0
    assert funnel == {
        "candidates": 20,
        "kept": 0,
        "not_selected": 14,
        "confirmed_false_negative": 6,
    }
    rows = forb.to_pylist()
    assert rows[0]["reason"] == "above_ceiling"  # already forbidden: not added twice
    assert sorted(r["doc_id"] for r in rows[1:]) == sorted(negs[1:])
    assert {r["reason"] for r in rows[1:]} == {"confirmed_false_negative"}
    assert known == {q: pos}
    fc = sections["fncheck"]
    assert (fc["checked"], fc["confirmed"], fc["dropped"], fc["negatives_removed"]) == (6, 6, 6, 6)
    assert sections["mining_quality"]["est_false_negative_rate"] == 1.0
    assert sections["score_source"] == {"source": "teacher", "model": str(tiny_cross_encoder),
                                        "kind": "cross_encoder"}  # fmt: skip
    # The shards' pos_score is now the teacher's score of (query, positive).
    sc = load(str(tiny_cross_encoder), "cross_encoder", 64, "teacher.scorer", "cpu")
    want = sc.score([qtext[q]] * len(pos), [dtext[p] for p in pos])
    np.testing.assert_allclose(out.column("pos_score").to_numpy(), want, atol=1e-5)


def test_apply_relabel_adds_known_positives_and_keeps_forbidden(cran, tiny_cross_encoder):
    q, pos, negs, mined, forbidden, qtext, dtext = cran
    cfg = run_cfg(tiny_cross_encoder, confirm_margin=1e6, action="relabel")
    funnel = Counter(candidates=6, kept=6)
    out, forb, known, sections = apply(cfg, mined, forbidden, funnel, {q: pos}, qtext, dtext)
    assert forb == forbidden
    assert known[q][: len(pos)] == pos and sorted(known[q][len(pos) :]) == sorted(negs)
    assert sections["fncheck"]["relabelled"] == 6 and sections["fncheck"]["dropped"] == 0
    # Curation carries them to the shards' known_pos_ids (multi-positive targets, or masked).
    table = known_table(known, {}, pl.from_arrow(out.column("query_id")))
    rows_df, _, _ = build_rows(out, table, {}, {q: 0}, pl.Series(list(dtext)))
    kp = dict(known_table(known, {}, rows_df["query_id"]).iter_rows())
    for r in rows_df.iter_rows(named=True):
        assert set(negs) <= set(kp[r["query_id"]]) and r["neg_scores"] == []


def test_apply_nothing_confirmed_changes_nothing_but_scores(cran, tiny_cross_encoder):
    q, pos, negs, mined, forbidden, qtext, dtext = cran
    cfg = run_cfg(tiny_cross_encoder, confirm_margin=-1e6)
    funnel = Counter(candidates=6, kept=6)
    out, forb, _, sections = apply(cfg, mined, forbidden, funnel, {q: pos}, qtext, dtext)
    assert out.column("neg_ids").to_pylist() == mined.column("neg_ids").to_pylist()
    assert forb == forbidden and funnel == {"candidates": 6, "kept": 6}
    assert sections["mining_quality"]["est_false_negative_rate"] == 0.0


def test_apply_without_scorers_returns_the_input(cran):
    q, pos, _, mined, forbidden, qtext, dtext = cran
    out, forb, known, sections = apply(
        config_from_dict({}),
        mined,
        forbidden,
        Counter(candidates=6, kept=6),
        {q: pos},
        qtext,
        dtext,
    )
    assert out is mined and forb is forbidden and known == {q: pos}
    assert sections["fncheck"] == {"enabled": False}
    assert sections["score_source"]["source"] == "miner"
    assert sections["mining_quality"]["est_false_negative_rate"] is None
