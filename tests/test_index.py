"""Index and search checked against brute force: flat, blocked, sharded + merged, IVF at full
nprobe."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from curate.config import IndexConfig
from curate.errors import ConfigError
from curate.index.build import build_index, choose_factory, merge_topk, search

FLAT = IndexConfig(factory="Flat")


def unit(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_topk(queries: np.ndarray, docs: np.ndarray, k: int):
    """Exact top-k by inner product in float64: (scores [Q, k], ids [Q, k])."""
    s = queries.astype(np.float64) @ docs.astype(np.float64).T  # [Q, N]
    ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, ids, 1), ids


def test_flat_search_equals_brute_force():
    docs, queries = unit(300, 16, 0), unit(25, 16, 1)
    dist, ids = search(build_index(docs, FLAT), queries, k=10)
    brute_dist, brute_ids = brute_topk(queries, docs, 10)
    assert dist.shape == ids.shape == (25, 10)
    assert dist.dtype == np.float32 and ids.dtype == np.int64
    np.testing.assert_array_equal(ids, brute_ids)
    np.testing.assert_allclose(dist, brute_dist, atol=1e-5)


def test_k_is_capped_at_index_size():
    docs, queries = unit(6, 8, 2), unit(3, 8, 3)
    dist, ids = search(build_index(docs, FLAT), queries, k=50)
    assert ids.shape == (3, 6)
    np.testing.assert_array_equal(np.sort(ids, axis=1), np.tile(np.arange(6), (3, 1)))


def test_small_query_blocks_equal_one_block():
    docs, queries = unit(200, 16, 4), unit(23, 16, 5)
    index = build_index(docs, FLAT)
    dist1, ids1 = search(index, queries, k=7, block=4096)
    dist3, ids3 = search(index, queries, k=7, block=3)  # 23 = 7 full blocks + 2 rows
    np.testing.assert_array_equal(ids1, ids3)
    np.testing.assert_array_equal(dist1, dist3)


@pytest.mark.parametrize("k", [4, 12, 40])  # 12 > the 5-doc and 7-doc shards; 40 > all 32 docs
def test_merge_of_shards_equals_unsharded_search(k):
    docs, queries = unit(32, 8, 6), unit(9, 8, 7)
    sizes = [5, 7, 20]
    offsets = [0, 5, 12]
    parts = [
        search(build_index(docs[o : o + n], FLAT), queries, k=k)
        for o, n in zip(offsets, sizes, strict=True)
    ]
    assert [p[1].shape[1] for p in parts] == [min(k, n) for n in sizes]
    dist, ids = merge_topk(parts, offsets, k)
    flat_dist, flat_ids = search(build_index(docs, FLAT), queries, k=k)
    assert ids.shape == flat_ids.shape == (9, min(k, 32))
    np.testing.assert_array_equal(ids, flat_ids)
    np.testing.assert_array_equal(dist, flat_dist)


def test_merge_orders_by_score_then_lower_id_and_missing_last():
    # Shard 0 holds ids 0..1, shard 1 holds ids 10..12 (offset 10); -1 is a missing hit.
    parts = [
        (np.array([[0.9, 0.5]], np.float32), np.array([[1, 0]])),
        (np.array([[0.9, 0.7, 0.0]], np.float32), np.array([[0, 2, -1]])),
    ]
    dist, ids = merge_topk(parts, [0, 10], k=5)
    assert ids.tolist() == [[1, 10, 12, 0, -1]]
    assert dist.tolist()[0][:4] == pytest.approx([0.9, 0.9, 0.7, 0.5])


def test_choose_factory():
    small = IndexConfig(flat_max=100, refine=None)
    assert choose_factory(100, 32, small) == "Flat"
    # 4 sqrt(200) = 56.6 -> 2^6, raised to the 2^10 floor; PQ m = 32 / 4 = 8.
    assert choose_factory(101, 32, small) == "IVF1024,PQ8x8"
    # 4 sqrt(1e6) = 4000 -> 2^12; m = 384 / 4 = 96.
    assert choose_factory(1_000_000, 384, small) == "IVF4096,PQ96x8"
    # 768 / 4 = 192 > 96 -> 768 / 8 = 96.
    assert choose_factory(1_000_000, 768, small) == "IVF4096,PQ96x8"
    # 1024 / 4, / 8, / 2 are all > 96: the largest divisor <= 96 (was a bare StopIteration).
    assert choose_factory(1_000_000, 1024, small) == "IVF4096,PQ64x8"
    assert choose_factory(1_000_000, 1536, small) == "IVF4096,PQ96x8"
    assert choose_factory(5, 32, IndexConfig(factory="HNSW32")) == "HNSW32"
    # Default: PQ candidates re-ranked with SQ8 codes.
    assert choose_factory(1_000_000, 384, IndexConfig(flat_max=100)) == "IVF4096,PQ96x8,Refine(SQ8)"


def test_refine_index_reranks_pq_candidates():
    # Clustered data, as embeddings are: coarse PQ codes scramble the close neighbours; SQ8
    # re-ranking of k_factor x k PQ candidates recovers the exact top-10.
    rng = np.random.default_rng(0)
    docs = unit(20, 32, 1)[rng.integers(0, 20, 4000)]
    docs += rng.standard_normal((4000, 32)).astype(np.float32) / np.sqrt(32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    queries = docs[:50] + 0.2 * unit(50, 32, 2)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    _, exact = search(build_index(docs, FLAT), queries, k=10)

    def recall(cfg):
        _, ids = search(build_index(docs, cfg), queries, k=10)
        return np.mean([len(set(a) & set(e)) / 10 for a, e in zip(ids, exact)])

    base = dict(nprobe=16, train_sample=4000, k_factor=32)
    refined = IndexConfig(factory="IVF16,PQ8x4,Refine(SQ8)", **base)
    assert faiss.downcast_index(build_index(docs, refined)).k_factor == 32
    assert recall(IndexConfig(factory="IVF16,PQ8x4", **base)) < 0.5
    assert recall(refined) > 0.95


def test_ivf_with_all_lists_probed_matches_flat():
    docs, queries = unit(1000, 16, 8), unit(20, 16, 9)
    ivf = build_index(docs, IndexConfig(factory="IVF16,Flat", nprobe=16, train_sample=1000))
    _, ids = search(ivf, queries, k=10)
    _, flat_ids = search(build_index(docs, FLAT), queries, k=10)
    recall = np.mean(
        [len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), flat_ids.tolist(), strict=True)]
    )
    assert recall == 1.0


def test_bad_factory_raises_config_error():
    with pytest.raises(ConfigError, match="NotAnIndex"):
        build_index(unit(10, 8, 0), IndexConfig(factory="NotAnIndex"))


# --- torch exact search (index.factory: torch-exact) -----------------------------------------


def _same_topk(got, want) -> None:
    """Scores to 1e-5; ids equal except where two scores within float error swap places."""
    (got_d, got_i), (want_d, want_i) = got, want
    np.testing.assert_allclose(got_d, want_d, atol=1e-5)
    swapped = got_i != want_i
    assert swapped.mean() < 0.01
    for q, j in zip(*np.nonzero(swapped)):  # a swap: the id sits nearby with the same score
        near = np.nonzero(want_i[q] == got_i[q, j])[0]
        assert len(near) == 1 and abs(want_d[q, near[0]] - got_d[q, j]) < 1e-5


@pytest.mark.parametrize("k", [1, 10, 700])  # 700 > one corpus tile below: merged across tiles
def test_torch_exact_equals_faiss_flat(k, monkeypatch):
    from curate.index import exact

    monkeypatch.setitem(exact.TILE_BYTES, "cpu", 4 * 7 * 300)  # tiles of 300 docs for 7 queries
    docs, queries = unit(1000, 24, 4), unit(20, 24, 5)
    flat = faiss.IndexFlatIP(24)
    flat.add(docs)
    want_d, want_i = flat.search(queries, k)
    got_d, got_i = exact.ExactSearch(docs, "cpu").search(queries, k, query_block=7)
    assert got_d.dtype == np.float32 and got_i.dtype == np.int64 and got_i.shape == (20, k)
    _same_topk((got_d, got_i), (want_d, want_i))


def test_torch_exact_caps_k_at_corpus_and_searches_a_flat_index_file(tmp_path):
    from curate.index import build as idx
    from pipelines.searching import _search_task

    docs, queries = unit(50, 8, 6), unit(4, 8, 7)
    cfg = IndexConfig(factory=idx.TORCH_EXACT, use_gpu="never")
    built = build_index(docs, cfg)
    assert isinstance(faiss.downcast_index(built), faiss.IndexFlat)  # stored as flat files
    idx.save_index(built, tmp_path / "index.faiss")
    got_d, got_i = _search_task(queries, str(tmp_path / "index.faiss"), 80, cfg, 1)
    want_d, want_i = search(build_index(docs, FLAT), queries, 80)
    assert got_i.shape == (4, 50)  # k cut to the 50 docs, no cap otherwise
    _same_topk((got_d, got_i), (want_d, want_i))


def test_faiss_gpu_above_its_k_cap_falls_back_to_cpu(caplog):
    from curate.index.build import GPU_MAX_K, gpu_for_k

    assert gpu_for_k(True, GPU_MAX_K) and not gpu_for_k(False, 10)
    with caplog.at_level("WARNING"):
        assert not gpu_for_k(True, GPU_MAX_K + 1, "shard-0")
    assert "searching shard-0 on the CPU" in caplog.text


def test_torch_exact_keeps_the_faiss_index_it_views_alive():
    # The CPU search views the flat index's storage without a copy; once the caller drops the
    # index (the worker keeps only the searcher), the view must still read the vectors.
    import gc

    from curate.index.build import torch_exact

    x = np.random.default_rng(0).standard_normal((5000, 32)).astype(np.float32)
    flat = faiss.IndexFlatIP(32)
    flat.add(x)
    searcher = torch_exact(flat, "never")
    del flat
    gc.collect()
    junk = [np.full((5000, 32), 7.0, dtype=np.float32) for _ in range(20)]  # reuse freed memory
    D, _ = searcher.search(x[:3], 5)
    want = np.sort(x[:3] @ x.T, axis=1)[:, ::-1][:, :5]
    np.testing.assert_allclose(D, want, atol=1e-4)
    assert len(junk) == 20


def test_npy_readers_give_the_rows_np_load_gives(tmp_path):
    """The readers of doc_vecs.npy that do not map it (shard fill, training sample, recall
    guard, mine tasks): the rows np.load gives, across chunk edges, for a shard's range and one
    past the end; a 1-D or Fortran-order file is refused by name."""
    from curate.files import NpyRows, RowSubset, npy_chunks

    vecs = np.random.default_rng(0).standard_normal((1000, 7)).astype(np.float32)
    np.save(tmp_path / "v.npy", vecs)
    for start, stop, chunk in ((0, 1000, 64), (130, 777, 100), (990, 5000, 4), (5, 5, 8)):
        got = list(npy_chunks(tmp_path / "v.npy", start, stop, chunk))
        assert all(len(g) <= chunk for g in got)
        want = vecs[start:stop]
        assert np.array_equal(np.concatenate(got) if got else want[:0], want)
    rows = NpyRows(tmp_path / "v.npy")  # the training sample's reader
    assert rows.shape == (1000, 7) and len(rows) == 1000
    pick = np.sort(np.random.default_rng(1).choice(1000, 50, replace=False))
    assert np.array_equal(rows[pick], vecs[pick]) and np.array_equal(rows[:], vecs)
    with pytest.raises(IndexError):
        rows[[1000]]
    assert np.array_equal(rows[[9, 3, 9]], vecs[[9, 3, 9]])  # any order, repeats
    # A mine task's block of rows: read once, indexed by file row number, a row it did not
    # read refused (it would otherwise be some other document's vector).
    block = RowSubset(tmp_path / "v.npy", [700, 3, 3, 42])
    assert len(block.rows) == 3 and np.array_equal(block[42], vecs[42])
    assert np.array_equal(block[np.array([700, 3, 700])], vecs[[700, 3, 700]])
    assert block[np.empty(0, np.int64)].shape == (0, 7)
    with pytest.raises(KeyError, match="outside the 3"):
        block[np.array([3, 4])]
    np.save(tmp_path / "f.npy", np.asfortranarray(vecs))
    np.save(tmp_path / "one.npy", vecs[:, 0])
    for bad in ("f.npy", "one.npy"):
        with pytest.raises(ValueError, match=bad):
            list(npy_chunks(tmp_path / bad, 0, 10))
