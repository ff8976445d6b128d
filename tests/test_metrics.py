import math
import random

import pytest

from curate.eval.metrics import evaluate_run


def brute_force(run, qrels, k_ndcg=10, k_recall=100, k_mrr=10):
    """Straight from the definitions, no shared helpers, for the randomised cross-check."""
    per = {}
    for q, docs in qrels.items():
        rels = {d: s for d, s in docs.items() if s > 0}
        if not rels:
            continue
        ranked = []
        for d in run.get(q, []):
            if d not in ranked:
                ranked.append(d)
        dcg = sum(rels.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:k_ndcg]))
        ideal = sorted(rels.values(), reverse=True)[:k_ndcg]
        idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
        hits = [i for i, d in enumerate(ranked[:k_mrr]) if d in rels]
        per[q] = {
            f"ndcg@{k_ndcg}": dcg / idcg,
            f"recall@{k_recall}": len([d for d in ranked[:k_recall] if d in rels]) / len(rels),
            f"mrr@{k_mrr}": 1 / (hits[0] + 1) if hits else 0.0,
        }
    return per


QRELS = {
    "q1": {"a": 2, "b": 1},
    "q2": {"c": 1},
    "q3": {"d": 1, "e": 1, "f": 2},
}
RUN = {
    "q1": ["b", "x", "a"],
    "q2": ["x", "y", "z", "c"],
    "q3": ["f", "y", "d"],
}


def test_hand_computed_values():
    per = evaluate_run(RUN, QRELS, per_query=True)
    # q1: gains 1, 0, 2 against ideal 2, 1.
    ndcg1 = (1 + 2 / math.log2(4)) / (2 + 1 / math.log2(3))
    # q2: a single relevant doc at rank 4.
    ndcg2 = (1 / math.log2(5)) / 1
    # q3: gains 2, 0, 1 against ideal 2, 1, 1; e is never retrieved.
    ndcg3 = (2 + 1 / math.log2(4)) / (2 + 1 / math.log2(3) + 1 / math.log2(4))
    assert per["q1"]["ndcg@10"] == pytest.approx(ndcg1)
    assert per["q2"]["ndcg@10"] == pytest.approx(ndcg2)
    assert per["q3"]["ndcg@10"] == pytest.approx(ndcg3)
    assert [per[q]["recall@100"] for q in ("q1", "q2", "q3")] == pytest.approx([1, 1, 2 / 3])
    assert [per[q]["mrr@10"] for q in ("q1", "q2", "q3")] == pytest.approx([1, 1 / 4, 1])

    mean = evaluate_run(RUN, QRELS)
    assert mean["ndcg@10"] == pytest.approx((ndcg1 + ndcg2 + ndcg3) / 3)
    assert mean["recall@100"] == pytest.approx((1 + 1 + 2 / 3) / 3)
    assert mean["mrr@10"] == pytest.approx((1 + 1 / 4 + 1) / 3)
    assert mean["queries"] == 3


def test_cutoffs_apply():
    per = evaluate_run(RUN, QRELS, k_ndcg=3, k_recall=3, k_mrr=3, per_query=True)
    assert per["q2"] == {"ndcg@3": 0.0, "recall@3": 0.0, "mrr@3": 0.0}
    assert per["q1"]["ndcg@3"] == pytest.approx((1 + 2 / math.log2(4)) / (2 + 1 / math.log2(3)))


def test_perfect_run_scores_one():
    run = {q: sorted(docs, key=lambda d: -docs[d]) for q, docs in QRELS.items()}
    assert evaluate_run(run, QRELS) == {
        "ndcg@10": 1.0,
        "recall@100": 1.0,
        "mrr@10": 1.0,
        "queries": 3,
    }


def test_empty_and_missing_runs_score_zero():
    assert evaluate_run({}, QRELS) == {
        "ndcg@10": 0.0,
        "recall@100": 0.0,
        "mrr@10": 0.0,
        "queries": 3,
    }
    empty = {q: [] for q in QRELS}
    assert evaluate_run(empty, QRELS)["ndcg@10"] == 0.0
    # A missing query counts as 0 instead of being dropped from the mean.
    partial = evaluate_run({"q2": ["c"]}, QRELS)
    assert partial["ndcg@10"] == pytest.approx(1 / 3)
    assert partial["queries"] == 3


def test_graded_gains_differ_from_binary():
    run = {"q": ["b", "a"]}
    graded = evaluate_run(run, {"q": {"a": 2, "b": 1}})["ndcg@10"]
    binary = evaluate_run(run, {"q": {"a": 1, "b": 1}})["ndcg@10"]
    assert binary == pytest.approx(1.0)
    assert graded == pytest.approx((1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3)))
    assert graded < binary


def test_unjudged_and_duplicate_entries():
    # Zero scores are not relevant; a query with only those is left out of the mean.
    qrels = {"q": {"a": 1, "z": 0}, "none": {"z": 0}}
    res = evaluate_run({"q": ["z", "a"], "extra": ["a"]}, qrels)
    assert res["queries"] == 1
    assert res["mrr@10"] == pytest.approx(1 / 2)
    # A relevant doc listed twice earns its gain once.
    assert evaluate_run({"q": ["a", "a", "a"]}, {"q": {"a": 1, "b": 1}})["ndcg@10"] < 1.0


def test_bad_cutoff_raises():
    with pytest.raises(ValueError, match="k_ndcg"):
        evaluate_run(RUN, QRELS, k_ndcg=0)


def test_matches_brute_force_on_random_runs():
    rng = random.Random(0)
    docs = [f"d{i}" for i in range(30)]
    qrels = {f"q{i}": {d: rng.choice([0, 1, 2]) for d in rng.sample(docs, 5)} for i in range(40)}
    run = {q: rng.sample(docs, rng.randint(0, 25)) for q in list(qrels)[:35]}
    for ks in ((10, 100, 10), (3, 5, 1), (1, 20, 20)):
        expected = brute_force(run, qrels, *ks)
        got = evaluate_run(run, qrels, *ks, per_query=True)
        assert got.keys() == expected.keys()
        for q in expected:
            assert got[q] == pytest.approx(expected[q])
