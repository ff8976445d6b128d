"""Pair scorers on Cranfield texts: a tiny random cross-encoder checked against a direct model
call, batching invariance, the bi-encoder against curate.embed.encoder, and load errors that name
the fix."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from curate.config import EmbedConfig
from curate.embed.encoder import Encoder
from curate.errors import ConfigError
from curate.mine.scorer import CrossEncoderScorer, PairScores, load, relevance, resolve


@pytest.fixture(scope="module")
def texts(cranfield):
    """(query texts [6], doc texts [6]) from Cranfield, long and short."""
    queries = [json.loads(line)["text"] for line in (cranfield / "queries.jsonl").open()][:6]
    docs = [json.loads(line)["text"] for line in (cranfield / "corpus.jsonl").open()][:6]
    return queries, docs


def test_cross_encoder_equals_one_pair_at_a_time(tiny_cross_encoder, texts):
    queries, docs = texts
    sc = load(str(tiny_cross_encoder), "cross_encoder", 128, "fncheck.scorer", "cpu")
    got = sc.score(queries, docs)
    assert got.dtype == np.float32 and got.shape == (6,)
    with torch.inference_mode():
        for q, d, g in zip(queries, docs, got, strict=True):
            enc = sc.tokenizer(q, d, truncation=True, max_length=128, return_tensors="pt")
            assert float(sc.model(**enc).logits[0, 0]) == pytest.approx(float(g), abs=1e-5)


def test_cross_encoder_scores_do_not_depend_on_batching(tiny_cross_encoder, texts):
    queries, docs = texts
    sc = load(str(tiny_cross_encoder), "cross_encoder", 128, "teacher.scorer", "cpu")
    big = sc.score(queries, docs)
    sc.token_budget = 64  # about one pair per batch
    np.testing.assert_allclose(sc.score(queries, docs), big, atol=1e-5)
    np.testing.assert_allclose(sc.score(queries[::-1], docs[::-1]), big[::-1], atol=1e-5)
    assert isinstance(sc, CrossEncoderScorer)


def test_relevance_of_one_and_two_label_heads():
    assert relevance(torch.tensor([[2.0], [-1.0]])).tolist() == [2.0, -1.0]
    assert relevance(torch.tensor([[1.0, 3.0]])).tolist() == [2.0]  # log-odds
    with pytest.raises(ConfigError, match="1 \\(a score\\) or 2"):
        relevance(torch.zeros(1, 3))


def test_embedder_scorer_is_the_cosine_of_encoder_embeddings(tiny_model, texts):
    queries, docs = texts
    sc = load(str(tiny_model), "embedder", 64, "fncheck.scorer", "cpu")
    enc = Encoder.load(EmbedConfig(model=str(tiny_model), max_length=64, device="cpu"), tiny_model)
    want = (enc.encode(queries) * enc.encode(docs)).sum(1)
    q2, d2 = [queries[0]] * 6, docs  # repeated texts are embedded once
    np.testing.assert_allclose(sc.score(queries, docs), want, atol=1e-5)
    np.testing.assert_allclose(
        sc.score(q2, d2), (enc.encode(q2[:1]) @ enc.encode(d2).T)[0], atol=1e-5
    )


def test_embedder_scorer_keeps_its_embeddings_in_the_cache_folder(tiny_model, texts, tmp_path):
    """A second run embeds only the texts the first did not; the scores are the same; another
    max length is another model key; a file that did not come from curate is left alone."""
    queries, docs = texts
    (tmp_path / "notes.txt").write_text("mine")
    want = load(str(tiny_model), "embedder", 64, "fncheck.scorer", "cpu").score(queries, docs)
    first = load(str(tiny_model), "embedder", 64, "fncheck.scorer", "cpu", tmp_path)
    np.testing.assert_allclose(first.score(queries[:3], docs[:3]), want[:3], atol=1e-6)
    files = sorted(tmp_path.glob("scorer-*.npz"))
    assert len(files) == 2  # the queries' and the docs' first embeddings

    calls = []
    again = load(str(tiny_model), "embedder", 64, "fncheck.scorer", "cpu", tmp_path)
    encode = again.encoder.encode
    again.encoder.encode = lambda t, *a, **k: calls.append(list(t)) or encode(t, *a, **k)
    np.testing.assert_allclose(again.score(queries, docs), want, atol=1e-6)
    assert sorted(t for c in calls for t in c) == sorted(set(queries[3:]) | set(docs[3:]))
    assert len(sorted(tmp_path.glob("scorer-*.npz"))) == 4

    calls.clear()
    np.testing.assert_allclose(again.score(queries, docs), want, atol=1e-6)
    assert calls == []  # everything cached, nothing written
    other = load(str(tiny_model), "embedder", 32, "fncheck.scorer", "cpu", tmp_path)
    assert other.cache.prefix != again.cache.prefix and len(other.cache.hashes) == 0
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_packaged_model_resolves_by_name_for_the_embedder_kind():
    assert (resolve("all-MiniLM-L6-v2", "embedder", "fncheck.scorer") / "config.json").is_file()
    with pytest.raises(ConfigError, match="fncheck.scorer: 'all-MiniLM-L6-v2' is not a local"):
        resolve("all-MiniLM-L6-v2", "cross_encoder", "fncheck.scorer")


def test_load_errors_name_the_key_and_the_fix(tmp_path, tiny_model):
    with pytest.raises(ConfigError, match="teacher.scorer: .*save_pretrained"):
        resolve(str(tmp_path / "nowhere"), "cross_encoder", "teacher.scorer")
    # A bi-encoder folder has no classification head: never load it with a random one.
    with pytest.raises(ConfigError, match="set fncheck.kind=embedder"):
        resolve(str(tiny_model), "cross_encoder", "fncheck.scorer")


class CountingScorer:
    name = "counting"

    def __init__(self):
        self.calls: list[int] = []

    def score(self, queries, docs):
        self.calls.append(len(queries))
        return np.array([len(q) + len(d) for q, d in zip(queries, docs, strict=True)], np.float32)


def test_pair_scores_scores_each_pair_once():
    sc = CountingScorer()
    ps = PairScores(sc, {"q1": "ab", "q2": "abc"}, {"d1": "x", "d2": "xyz"})
    assert ps([("q1", "d1"), ("q2", "d2"), ("q1", "d1")]).tolist() == [3, 6, 3]
    assert ps([("q2", "d2"), ("q1", "d2")]).tolist() == [6, 5]
    assert sc.calls == [2, 1]


def test_pair_scores_rejects_nan():
    class Nan(CountingScorer):
        def score(self, queries, docs):
            return np.full(len(queries), np.nan, np.float32)

    with pytest.raises(FloatingPointError, match="NaN"):
        PairScores(Nan(), {"q": "a"}, {"d": "b"})([("q", "d")])
