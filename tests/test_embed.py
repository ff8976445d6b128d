"""Embedding: token-budget batching, agreement with sentence-transformers, the dtype choice, and
resume of the Dask embedding stage by content hash."""

from __future__ import annotations

import numpy as np
import pytest

from curate.config import ClusterConfig, EmbedConfig
from curate.embed import plan as embed_plan
from curate.embed.encoder import (
    Encoder,
    model_fingerprint,
    resolve_dtype,
    resolve_model,
    token_budget_batches,
)
from curate.errors import ConfigError

SENTENCES = [
    "The boundary layer separates at high angles of attack.",
    "a",
    "Heat transfer in hypersonic flow over a flat plate with a very long leading edge region",
    "What similarity laws must be obeyed when constructing aeroelastic models of heated high speed "
    "aircraft?",
    "Nozzle flow.",
]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("budget", [1, 40, 256, 5000])
def test_token_budget_batches_cover_every_row_once_sorted_and_within_budget(seed, budget):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 300, size=int(rng.integers(1, 400)))
    batches = token_budget_batches(lengths, budget)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))  # every index exactly once
    assert np.all(np.diff(lengths[flat]) <= 0)  # longest first, across and within batches
    for i, b in enumerate(batches):
        longest = lengths[b].max()
        assert len(b) * longest <= budget or len(b) == 1  # only a lone oversize row exceeds
        if i + 1 < len(batches):
            assert (len(b) + 1) * longest > budget  # greedy: one more row would not have fit
    assert sum(len(b) for b in batches) == len(lengths)


def test_token_budget_batches_fill_up_to_the_budget():
    assert [b.tolist() for b in token_budget_batches(np.array([3, 10, 3, 3, 5]), 10)] == [
        [1],
        [4, 0],
        [2, 3],
    ]


def _plan_batches(parts) -> list[list[int]]:
    out = []
    for part in parts:
        ends = np.cumsum(part.sizes)
        out += [part.rows[e - n : e].tolist() for n, e in zip(part.sizes, ends)]
    return out


@pytest.mark.parametrize("seed", range(5))
def test_plan_batches_do_not_depend_on_partition_size(seed):
    """Partitions only group whole batches: every partition size gives the same batches, each
    within the budget, longest first, every text exactly once."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 3000))
    lengths = rng.integers(1, 300, size=n)
    hashes = rng.integers(0, 2**63, size=n, dtype=np.uint64)
    want = _plan_batches(embed_plan.plan(lengths, hashes, 2048, n))
    assert sorted(i for b in want for i in b) == list(range(n))
    assert all(len(b) * lengths[b].max() <= 2048 or len(b) == 1 for b in want)
    flat = np.concatenate(want)
    assert np.all(np.diff(lengths[flat]) <= 0)
    for size in (1, 7, 100, 1024):
        parts = embed_plan.plan(lengths, hashes, 2048, size)
        assert _plan_batches(parts) == want
        assert all(sum(p.sizes) <= size or len(p.sizes) == 1 for p in parts)


def test_plan_is_content_defined():
    """An added text moves only the batches near it: the batches far from it are kept, so the
    content-addressed cache keeps their partitions."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, size=5000)
    hashes = rng.integers(0, 2**63, size=5000, dtype=np.uint64)
    before = {tuple(b) for b in _plan_batches(embed_plan.plan(lengths, hashes, 2048, 256))}
    after = _plan_batches(
        embed_plan.plan(np.append(lengths, 150), np.append(hashes, np.uint64(12345)), 2048, 256)
    )
    assert len({tuple(b) for b in after} - before) <= 5 < len(before)


def test_encoder_runs_the_given_batches(tiny_model):
    """With ``sizes`` the texts are embedded in exactly those consecutive batches: one text in a
    batch of its own gives what a batch of it alone gives."""
    enc = Encoder.load(EmbedConfig(dtype="float32", device="cpu"), tiny_model)
    got = enc.encode(SENTENCES, sizes=[2, 1, 2])
    np.testing.assert_array_equal(got[2], enc.encode(SENTENCES[2:3])[0])
    np.testing.assert_allclose(got, enc.encode(SENTENCES), atol=1e-5)


def test_encoder_matches_sentence_transformers_on_minilm_fp32():
    from sentence_transformers import SentenceTransformer

    path = resolve_model("all-MiniLM-L6-v2")
    st = SentenceTransformer(str(path), device="cpu")
    want = st.encode(SENTENCES, normalize_embeddings=True, convert_to_numpy=True)
    enc = Encoder.load(
        EmbedConfig(dtype="float32", device="cpu", max_length=st.max_seq_length), path
    )
    got = enc.encode(SENTENCES)
    assert got.shape == want.shape == (5, 384)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_bf16_on_cpu_stays_close_to_fp32(tiny_model):
    fp32 = Encoder.load(EmbedConfig(dtype="float32", device="cpu"), tiny_model).encode(SENTENCES)
    bf16 = Encoder.load(EmbedConfig(dtype="bfloat16", device="cpu"), tiny_model).encode(SENTENCES)
    assert bf16.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(bf16, axis=1), 1.0, atol=1e-5)
    assert (fp32 * bf16).sum(1).min() > 0.99  # cosine of each pair


def test_resolve_dtype():
    from curate.embed.encoder import cpu_has_native_bf16

    assert resolve_dtype("auto", "cpu") == ("bfloat16" if cpu_has_native_bf16() else "float32")
    assert resolve_dtype("int8", "cpu") == "int8"
    assert resolve_dtype("float32", "cuda") == "float32"
    with pytest.raises(ConfigError, match="int8"):
        resolve_dtype("int8", "cuda")


class CountingClient:
    """A real Dask client that counts the tasks submitted through it."""

    def __init__(self, client):
        self.client, self.submitted = client, []

    def submit(self, *args, key=None, **kw):
        self.submitted.append(key)
        return self.client.submit(*args, key=key, **kw)

    def __getattr__(self, name):
        return getattr(self.client, name)


def test_embed_texts_resumes_by_content_hash(tmp_path, tiny_model):
    from pipelines.cluster import Workers, connect
    from pipelines.embedding import embed_texts

    # A small budget: many batches of a few rows, so partitions of 4 texts are several.
    cfg = EmbedConfig(
        model=str(tiny_model), max_length=32, partition_size=4, dtype="float32", token_budget=64
    )
    ids = [f"d{i}" for i in range(40)]
    texts = [f"text number {i} " * (i % 7 + 1) for i in range(40)]
    fp = model_fingerprint(tiny_model)
    with connect(ClusterConfig(n_workers=1, threads_per_worker=1), quiet=True) as w:
        counting = CountingClient(w.client)
        workers = Workers(counting, w.n_workers, 1)
        got_ids, first = embed_texts(workers, ids, texts, "", tiny_model, fp, cfg, tmp_path)
        assert got_ids == ids and first.shape == (40, 32)
        files = sorted(tmp_path.glob("*.parquet"))
        embeds = [k for k in counting.submitted if k.startswith("embed-")]
        assert len(embeds) == len(files) >= 5  # one task per partition
        # plus one tokenizing and one joining the partitions into the file the driver maps
        assert len(counting.submitted) == len(embeds) + 2
        assert isinstance(first, np.memmap)  # the driver maps the joined file, holds no vector
        stamps = {p: p.stat().st_mtime_ns for p in files}

        counting.submitted.clear()
        _, again = embed_texts(workers, ids, texts, "", tiny_model, fp, cfg, tmp_path)
        assert counting.submitted == []  # every partition (and the token lengths) found on disk
        assert {p: p.stat().st_mtime_ns for p in files} == stamps
        np.testing.assert_array_equal(again, first)

        # One changed text re-embeds the partitions between its old and new place in the plan
        # (on 40 texts, most; test_plan_is_content_defined has the locality at scale); the
        # others are reused.
        texts[5] = "an edited text"
        _, edited = embed_texts(workers, ids, texts, "", tiny_model, fp, cfg, tmp_path)
        redone = [k for k in counting.submitted if k.startswith("embed-")]
        assert 1 <= len(redone) < len(files)
        assert len(list(tmp_path.glob("*.parquet"))) == len(files) + len(redone)
        others = [i for i in range(40) if i != 5]
        np.testing.assert_allclose(edited[others], first[others], atol=1e-6)

        # float16 storage is a different cache entry and reads back as float32.
        counting.submitted.clear()
        half = EmbedConfig(**{**cfg.__dict__, "store_dtype": "float16"})
        before = len(list(tmp_path.glob("*.parquet")))
        _, h = embed_texts(workers, ids, texts, "", tiny_model, fp, half, tmp_path)
        assert len(counting.submitted) == len(list(tmp_path.glob("*.parquet"))) - before + 1
        assert h.dtype == np.float32
        np.testing.assert_allclose(h, edited, atol=1e-3)
