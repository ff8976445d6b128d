"""Recall guard: brute force checked against numpy, recall's edge cases by hand, and the guard on
Cranfield embedded with the tiny model (real FAISS IVF / HNSW / PQ indexes over 1,400 docs)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from curate.config import EmbedConfig, IndexConfig
from curate.embed.encoder import Encoder
from curate.index.build import build_index, search
from curate.index.recall import RecallError, exact_search, guard, is_exact, max_probe, recall_at_k


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def cran_vecs(cranfield, tiny_model):
    """(doc vectors [1400, 32], query vectors [225, 32]) of Cranfield from the tiny BERT."""
    enc = Encoder.load(EmbedConfig(model=str(tiny_model), max_length=64, device="cpu"), tiny_model)
    docs = [json.loads(line) for line in (cranfield / "corpus.jsonl").open()]
    queries = [json.loads(line) for line in (cranfield / "queries.jsonl").open()]
    doc_vecs = enc.encode([f"{d['title']} {d['text']}" for d in docs])
    return doc_vecs, enc.encode([q["text"] for q in queries])


def brute(docs, queries, k):
    s = queries.astype(np.float64) @ docs.astype(np.float64).T
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, ids, 1), ids


def test_exact_search_equals_brute_force_across_doc_blocks():
    rng = np.random.default_rng(0)
    docs, queries = unit(rng.standard_normal((500, 8))), unit(rng.standard_normal((20, 8)))
    for block, k in [(7, 10), (64, 50), (1000, 10), (100, 600)]:  # k > block; k > N is capped
        D, ids = exact_search(docs, queries, k, doc_block=block)
        bD, bids = brute(docs, queries, min(k, 500))
        assert ids.shape == bids.shape
        np.testing.assert_allclose(D, bD, atol=1e-5)
        assert (ids == bids).mean() > 0.99  # only float ties may swap


def test_recall_counts_padding_as_miss_and_reports_it():
    docs = unit(np.eye(4) + 0.01)
    q = unit([[1, 0.5, 0.2, 0]])
    D, ids = exact_search(docs, q, 3)
    assert recall_at_k(docs, q, ids, D) == (1.0, 0, 0)
    padded = ids.copy()
    padded[0, 2] = -1  # an IVF index that found only 2 of the 3
    assert recall_at_k(docs, q, padded, D) == (pytest.approx(2 / 3), 1, 1)
    wrong = ids.copy()
    wrong[0, 2] = ids[0, 0]  # a repeated hit counts once
    assert recall_at_k(docs, q, wrong, D)[0] == pytest.approx(2 / 3)


def test_recall_counts_a_tie_at_the_kth_score_as_a_hit():
    # d1 and d2 are the same vector (duplicate docs): either one completes the top-2.
    docs = unit([[1, 0, 0], [0.6, 0.8, 0], [0.6, 0.8, 0], [0, 0, 1]])
    q = unit([[1, 0.1, 0]])
    D, ids = exact_search(docs, q, 2)
    other = 3 - ids[0, 1]  # the duplicate the exact search did not list
    assert recall_at_k(docs, q, np.array([[0, other]]), D)[0] == 1.0
    assert recall_at_k(docs, q, np.array([[0, 3]]), D)[0] == 0.5


def test_flat_index_is_exact_and_not_measured(cran_vecs):
    docs, queries = cran_vecs
    index = build_index(docs, IndexConfig(factory="Flat"))
    assert is_exact(index)
    nprobe, rec = guard(index, docs, queries, 100, IndexConfig(factory="Flat", nprobe=3), 0)
    assert nprobe == 3
    assert rec == {"exact": True, "k": 100, "floor": 0.95, "action": "fail", "nprobe": 3}


def ivf(docs, nprobe=1, **kw) -> tuple:
    cfg = IndexConfig(factory="IVF64,Flat", nprobe=nprobe, train_sample=1400, **kw)
    return build_index(docs, cfg), cfg


def test_low_nprobe_fails_naming_the_fix_and_reports_missing_hits(cran_vecs):
    docs, queries = cran_vecs
    index, cfg = ivf(docs)
    assert not is_exact(index) and max_probe(index) == 64
    # ~22 docs per list, k = 100: a search of one list returns far fewer than k real hits.
    _, hits = search(index, queries, 100)
    assert (hits == -1).any()
    with pytest.raises(RecallError) as err:
        guard(index, docs, queries, 100, cfg, 0)
    msg = str(err.value)
    assert "below index.recall_floor=0.95" in msg and "missing hits" in msg
    assert "index.recall_action=raise_nprobe" in msg


def test_raise_nprobe_doubles_until_the_floor_holds(cran_vecs):
    docs, queries = cran_vecs
    index, cfg = ivf(docs, recall_action="raise_nprobe", recall_sample=100)
    nprobe, rec = guard(index, docs, queries, 100, cfg, seed=0)
    steps = [a["nprobe"] for a in rec["attempts"]]
    assert steps == [2**i for i in range(len(steps))] and steps[-1] == nprobe > 1
    assert rec["recall"] >= 0.95 and rec["nprobe"] == nprobe and rec["sample"] == 100
    first = rec["attempts"][0]
    assert first["recall"] < 0.95 and first["missing_hits"] > 0 and first["short_queries"] > 0
    recalls = [a["recall"] for a in rec["attempts"]]
    assert recalls == sorted(recalls)


def test_all_lists_probed_is_exact_recall(cran_vecs):
    docs, queries = cran_vecs
    index, cfg = ivf(docs, nprobe=64)
    _, rec = guard(index, docs, queries, 100, cfg, 0)
    assert rec["recall"] == pytest.approx(1.0) and rec["missing_hits"] == 0


def test_hnsw_raises_ef_search(cran_vecs):
    docs, queries = cran_vecs
    cfg = IndexConfig(factory="HNSW8", nprobe=1, recall_action="raise_nprobe")
    index = build_index(docs, cfg)
    index.hnsw.efSearch = 4  # faiss' default is 16; start low so the guard has to raise it
    nprobe, rec = guard(index, docs, queries, 50, cfg, 0)
    steps = [a["nprobe"] for a in rec["attempts"]]
    assert steps[0] == 4 and steps == sorted(set(steps))  # every attempt searches wider
    assert rec["recall"] >= 0.95 and nprobe == index.hnsw.efSearch == steps[-1]


def test_pq_cannot_be_raised_and_fails_with_the_exact_index_fix(cran_vecs):
    docs, queries = cran_vecs
    cfg = IndexConfig(factory="PQ4x4", recall_action="raise_nprobe", train_sample=1400)
    index = build_index(docs, cfg)
    assert max_probe(index) == 0
    with pytest.raises(RecallError, match="index.factory=Flat"):
        guard(index, docs, queries, 100, cfg, 0)
