"""Batch composition (curate.batch.compose), exact dedup (curate.batch.dedup) and topics
(curate.batch.topics)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import polars as pl
import pytest

from curate.batch.compose import Row, compose
from curate.batch.dedup import add_text_hash, canonical_ids, repeated_rows, semantic_duplicates
from curate.batch.topics import cluster, n_topics_for
from curate.config import BatchConfig


def row(pos: str, negs: str = "", known: str = "", topic: int = 0) -> Row:
    """Row("a", "x y", "a b") -> pos a, negatives (x, y), known positives {a, b} (pos always)."""
    return Row(pos, tuple(negs.split()), frozenset(known.split()) | {pos}, topic)


def overlapping_rows() -> list[Row]:
    """40 rows over 30 docs: positives repeat, negatives overlap other rows' positives and
    negatives, queries with two positives share their known set; 3 topics."""
    docs = [f"d{i:02d}" for i in range(30)]
    rows = []
    for i in range(40):
        pos = docs[i % 30]
        negs = " ".join(docs[(i * 7 + j) % 30] for j in (1, 2, 3) if docs[(i * 7 + j) % 30] != pos)
        other = docs[(i + 15) % 30] if i % 4 == 0 else ""
        rows.append(row(pos, negs, other, topic=i % 3))
    return rows


def check_no_repeat_in_batch(rows, batches, negs):
    for b in batches:
        docs = [d for i in b for d in (rows[i].pos, *negs[i])]
        assert len(docs) == len(set(docs)), f"doc repeated in batch {b}: {Counter(docs)}"


@pytest.mark.parametrize("topics", ["spread", "cluster", "off"])
@pytest.mark.parametrize("mode", ["mask", "separate"])
def test_every_row_once_and_no_doc_twice_in_a_batch(mode, topics):
    rows = overlapping_rows()
    cfg = BatchConfig(batch_size=8, topics=topics, same_topic=0.5, shared_positives=mode)
    batches, negs, stats = compose(rows, cfg, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(40))
    assert all(1 <= len(b) <= 8 for b in batches)
    assert sorted(negs) == list(range(40))
    for i in range(40):  # kept negatives are a subsequence of the row's negatives
        it = iter(rows[i].negs)
        assert all(n in it for n in negs[i])
    check_no_repeat_in_batch(rows, batches, negs)
    dropped = sum(len(r.negs) for r in rows) - sum(len(n) for n in negs.values())
    assert stats["neg_dropped_in_batch"] == dropped
    assert stats["batches"] == len(batches)


def test_row_whose_positive_is_in_the_batch_goes_elsewhere():
    # Two queries with the same positive "a": never in one batch, even with room for both.
    rows = [row("a", "x"), row("a", "y")]
    batches, negs, stats = compose(rows, BatchConfig(batch_size=4, same_topic=1.0), seed=0)
    assert sorted(map(sorted, batches)) == [[0], [1]]
    assert negs == {0: ("x",), 1: ("y",)}
    assert stats["neg_dropped_in_batch"] == 0


def test_positive_that_is_another_rows_negative():
    # Row 1's positive b is row 0's negative. Either order is fine, but never both b's in a batch:
    # row 0 first -> b is taken, row 1 waits; row 1 first -> row 0 joins and loses negative b.
    rows = [row("a", "b x"), row("b", "y")]
    n_batches = set()
    for seed in range(6):
        batches, negs, stats = compose(rows, BatchConfig(batch_size=2, same_topic=1.0), seed)
        n_batches.add(len(batches))
        if len(batches) == 1:
            assert batches == [[1, 0]]
            assert negs == {1: ("y",), 0: ("x",)}
            assert stats["neg_dropped_in_batch"] == 1
        else:
            assert batches == [[0], [1]]
            assert negs == {0: ("b", "x"), 1: ("y",)}
            assert stats["neg_dropped_in_batch"] == 0
    assert n_batches == {1, 2}  # both orders occur among these seeds


def test_negative_already_in_batch_dropped_from_later_row():
    rows = [row("a", "x y"), row("b", "x z")]
    batches, negs, stats = compose(rows, BatchConfig(batch_size=2, same_topic=1.0), seed=0)
    assert len(batches) == 1
    first, second = batches[0]
    assert negs[first] == rows[first].negs  # the first row keeps x
    assert negs[second] == tuple(n for n in rows[second].negs if n != "x")
    assert stats["neg_dropped_in_batch"] == 1


def test_spare_negative_replaces_one_already_in_the_batch():
    # Each row wants 2 negatives of 3 (the third is a spare); x is in both rows' first two.
    rows = [row("a", "x y s1"), row("b", "x z s2")]
    batches, negs, stats = compose(rows, BatchConfig(batch_size=2, same_topic=1.0), 0, want=2)
    first, second = batches[0]
    assert negs[first] == rows[first].negs[:2]  # no collision: the spare stays unused
    assert negs[second] == tuple(n for n in rows[second].negs if n != "x")  # z and its spare
    assert stats["neg_dropped_in_batch"] == 1
    assert stats["neg_spares_used"] == 1 and stats["rows_short_of_negatives"] == 0
    check_no_repeat_in_batch(rows, batches, negs)


def test_row_without_enough_spares_is_counted_short():
    rows = [row("a", "x y"), row("b", "x y")]
    batches, negs, stats = compose(rows, BatchConfig(batch_size=2, same_topic=1.0), 0, want=2)
    assert [len(negs[i]) for i in batches[0]] == [2, 0]
    assert stats["neg_dropped_in_batch"] == 2 and stats["rows_short_of_negatives"] == 1


def test_want_caps_negatives_of_every_row():
    rows = overlapping_rows()
    _, negs, _ = compose(rows, BatchConfig(batch_size=8), 0, want=1)
    assert all(len(n) <= 1 for n in negs.values())
    assert sum(len(n) for n in negs.values()) > 30  # spares fill in for most collisions


def collision_rows() -> list[Row]:
    # Row 0 (query with positives a, b) and row 1 (positive b; c is also known for it).
    # Together: b is row 0's known positive in row 1's column; a and c (row 0's positive and
    # negative) are row 1's known positives -> 3 masked (row, doc) pairs.
    return [row("a", "n1 c", "b"), row("b", "n2", "a c")]


def test_shared_positives_mask_keeps_rows_together_and_counts_collisions():
    batches, negs, stats = compose(collision_rows(), BatchConfig(batch_size=2), seed=0)
    assert len(batches) == 1 and sorted(batches[0]) == [0, 1]
    assert negs == {0: ("n1", "c"), 1: ("n2",)}
    assert stats["masked_pairs"] == 3


def test_shared_positives_separate_keeps_rows_apart():
    cfg = BatchConfig(batch_size=2, shared_positives="separate")
    batches, negs, stats = compose(collision_rows(), cfg, seed=0)
    assert sorted(map(sorted, batches)) == [[0], [1]]
    assert stats["masked_pairs"] == 0


def test_separate_never_collides_on_overlapping_rows():
    rows = overlapping_rows()
    cfg = BatchConfig(batch_size=8, same_topic=0.5, shared_positives="separate")
    batches, negs, stats = compose(rows, cfg, seed=3)
    for b in batches:
        for i in b:
            for j in b:
                if i != j:
                    assert not rows[i].known & {rows[j].pos, *negs[j]}, (i, j)
    assert stats["masked_pairs"] == 0
    # The same rows in mask mode do collide, so the check above is not vacuous.
    _, _, mask_stats = compose(rows, BatchConfig(batch_size=8, same_topic=0.5), seed=3)
    assert mask_stats["masked_pairs"] > 0


def test_same_seed_same_batches_other_seed_differs():
    rows = overlapping_rows()
    cfg = BatchConfig(batch_size=4, same_topic=0.5)
    a = compose(rows, cfg, seed=0)
    assert compose(rows, cfg, seed=0) == a
    assert any(compose(rows, cfg, seed=s)[0] != a[0] for s in range(1, 6))


def test_full_topic_share_gives_single_topic_batches():
    rows = [row(f"p{i}", f"n{i}", topic=i % 2) for i in range(16)]
    cfg = BatchConfig(batch_size=4, topics="cluster", same_topic=1.0)
    batches, _, _ = compose(rows, cfg, seed=1)
    assert len(batches) == 4
    assert all(len({rows[i].topic for i in b}) == 1 for b in batches)


def topic_rows(n_topics: int, per_topic: int, queries_per_topic: int = 0) -> list[Row]:
    """Rows with distinct positives and negatives; row k of topic t belongs to query
    t.(k mod queries_per_topic) (one query per row when 0)."""
    rows = []
    for t in range(n_topics):
        for k in range(per_topic):
            q = f"q{t}.{k % queries_per_topic if queries_per_topic else k}"
            rows.append(Row(f"p{t}.{k}", (f"n{t}.{k}",), frozenset({f"p{t}.{k}"}), t, q))
    return rows


def test_spread_mixes_topics_up_to_the_cap():
    rows = topic_rows(n_topics=4, per_topic=16)
    batches, _, stats = compose(rows, BatchConfig(batch_size=4, topics="spread"), seed=0)
    assert sorted(i for b in batches for i in b) == list(range(64))
    assert len(batches) == 16  # the caps never left a batch short
    assert all(len({rows[i].topic for i in b}) == 4 for b in batches)  # cap ceil(4/4) = 1
    assert stats["rows_over_topic_cap"] == 0
    # cluster mode on the same rows packs one topic, so the check above is not vacuous
    clustered, _, _ = compose(rows, BatchConfig(batch_size=4, topics="cluster", same_topic=1.0), 0)
    assert all(len({rows[i].topic for i in b}) == 1 for b in clustered)


def test_spread_topic_cap_setting_and_uneven_topics():
    # Topic 0 has 3/4 of the rows: with cap 2 a batch of 4 still mixes, and the rows it
    # cannot mix (the end, when only topic 0 is left) are placed over the cap and counted.
    rows = [
        Row(f"p{i}", (f"n{i}",), frozenset({f"p{i}"}), 0 if i < 24 else 1 + (i - 24) // 4, f"q{i}")
        for i in range(32)
    ]
    batches, _, stats = compose(rows, BatchConfig(batch_size=4, topics="spread", topic_cap=2), 1)
    over = sum(max(0, Counter(rows[i].topic for i in b)[0] - 2) for b in batches)
    assert over == stats["rows_over_topic_cap"] > 0
    assert sorted(i for b in batches for i in b) == list(range(32))


def test_max_rows_per_query_caps_a_querys_positives_in_a_batch():
    rows = topic_rows(n_topics=2, per_topic=12, queries_per_topic=2)  # 6 positives per query
    for topics in ("spread", "cluster", "off"):
        cfg = BatchConfig(batch_size=4, topics=topics, same_topic=1.0, max_rows_per_query=1)
        batches, _, _ = compose(rows, cfg, seed=0)
        assert sorted(i for b in batches for i in b) == list(range(24))
        assert all(max(Counter(rows[i].query for i in b).values()) == 1 for b in batches), topics
    uncapped, _, _ = compose(rows, BatchConfig(batch_size=4, topics="cluster", same_topic=1.0), 0)
    assert any(max(Counter(rows[i].query for i in b).values()) > 1 for b in uncapped)


def test_drop_last():
    rows = [row(f"p{i}", f"n{i}") for i in range(5)]
    batches, _, stats = compose(rows, BatchConfig(batch_size=2), seed=0)
    assert [len(b) for b in batches] == [2, 2, 1]
    assert (stats["batches"], stats["full_batches"]) == (3, 2)
    batches, _, stats = compose(rows, BatchConfig(batch_size=2, drop_last=True), seed=0)
    assert [len(b) for b in batches] == [2, 2]
    assert (stats["batches"], stats["full_batches"], stats["rows_dropped_last"]) == (2, 2, 1)


# --- dedup ---------------------------------------------------------------------------------


def test_canonical_ids_map_text_variants_to_smallest_id():
    corpus = pl.DataFrame(
        {
            "doc_id": ["d9", "d2", "d5", "d7"],
            "title": ["", "", "", "Hello"],
            "text": ["Hello, World", "hello   world", "something else", "world"],
        }
    )
    canon = canonical_ids(add_text_hash(corpus))
    # "Hello world" from title + text collides too: the hash is of title + " " + text.
    assert canon.rows() == [("d2", "d2"), ("d5", "d5"), ("d7", "d2"), ("d9", "d2")]


@pytest.mark.parametrize("n", [0, 1, 2, 7, 5000])
def test_repeated_rows_are_the_rows_is_duplicated_flags(n):
    rng = np.random.default_rng(n)
    for high in (max(n // 3, 1), 2**64 - 1):  # many repeats; almost none (full u64 range)
        h = rng.integers(0, high, n, dtype=np.uint64, endpoint=True)
        want = np.flatnonzero(pl.Series(h).is_duplicated().to_numpy())
        assert np.array_equal(repeated_rows(h), want)


def test_semantic_duplicates_links_close_vectors():
    s = np.sqrt(1 - 0.99**2)
    vecs = np.array([[0.99, s, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0]], dtype=np.float32)
    merged = semantic_duplicates(["b", "a", "c", "d"], vecs, threshold=0.98, n_clusters=1)
    assert merged == [("b", "a", 0.99)]
    assert semantic_duplicates(["b", "a", "c", "d"], vecs, threshold=0.995, n_clusters=1) == []


# --- topics --------------------------------------------------------------------------------


def blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """3 tight blobs of 20 unit vectors around e0, e1, e2 in 8 dims; -> (vecs, true blob)."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(3), 20)
    x = np.eye(8, dtype=np.float32)[truth] + 0.05 * rng.standard_normal((60, 8)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), truth


def test_cluster_finds_separated_blobs_deterministically():
    vecs, truth = blobs()
    labels = cluster(vecs, 3, seed=0)
    assert labels.dtype == np.int32 and labels.shape == (60,)
    # One label per blob, three different labels.
    assert [len(set(labels[truth == b])) for b in range(3)] == [1, 1, 1]
    assert len({labels[0], labels[20], labels[40]}) == 3
    np.testing.assert_array_equal(cluster(vecs, 3, seed=0), labels)


def test_cluster_degenerate_k():
    vecs, _ = blobs()
    assert cluster(vecs, 1, seed=0).tolist() == [0] * 60
    assert cluster(vecs[:3], 3, seed=0).tolist() == [0, 0, 0]


def test_n_topics_for():
    assert n_topics_for(100, 0, 32) == 3  # sqrt 10, but 100 // 32 = 3 fills a batch each
    assert n_topics_for(10_000, 0, 32) == 100  # sqrt 100 < 312
    assert n_topics_for(10, 0, 32) == 1  # fewer queries than a batch
    assert n_topics_for(100, 5, 32) == 5  # requested wins
    assert n_topics_for(3, 10, 32) == 3  # but never more than the queries


def test_text_hash_column_is_the_u64_prefix_of_the_text_hash():
    from curate.text import text_hash

    corpus = pl.DataFrame({"doc_id": ["a", "b"], "title": ["T", ""], "text": ["x y", "Z"]})
    got = add_text_hash(corpus)["hash"]
    assert got.dtype == pl.UInt64
    assert got.to_list() == [int(text_hash("T x y")[:16], 16), int(text_hash(" Z")[:16], 16)]


def test_build_rows_drops_by_doc_number_per_query():
    """build_rows on doc numbers: a duplicate maps onto its canonical doc (and then repeats one
    already in the row), a known positive and a forbidden doc are dropped for their own query
    only, a repeated id is kept once; scores and ranks stay aligned with what is kept."""
    import pyarrow as pa

    from curate import schema
    from curate.batch.compose import RowTable
    from curate.batch.curation import build_rows, known_table

    docs = pl.Series(["a", "b", "b2", "c", "k", "f"], dtype=pl.String)
    negs = [["b", "c", "b2", "k", "f", "c"], ["k", "f", "b2"]]
    scores = [[0.6, 0.5, 0.4, 0.3, 0.2, 0.1], [0.7, 0.6, 0.5]]
    mined = pa.table({
        "query_id": ["q", "q2"], "pos_id": ["a", "c"], "pos_score": [0.9, 0.8],
        "neg_ids": negs, "neg_scores": scores, "neg_ranks": [[1, 2, 3, 4, 5, 6], [1, 2, 3]],
    }).cast(schema.MINED)  # fmt: skip
    forbidden = pa.table({"query_id": ["q"], "doc_id": ["f"], "reason": ["near_duplicate"],
                          "score": pa.array([0.2], pa.float32())}, schema=schema.FORBIDDEN)
    known = {"q": ["a", "k"], "q2": ["c"]}
    known = known_table(known, {"b2": "b"}, pl.from_arrow(mined.column("query_id")))
    out, rows, stats = build_rows(mined, known, {"b2": "b"}, {"q": 3, "q2": 5}, docs, forbidden)
    assert isinstance(rows, RowTable) and len(rows) == 2
    assert [docs[list(rows[i].negs)].to_list() for i in range(2)] == [["b", "c"], ["k", "f", "b"]]
    assert rows[0].known == frozenset({0, 4}) and rows[1].known == frozenset({3})
    assert (rows[0].pos, rows[0].topic, rows[1].topic) == (0, 3, 5)
    assert stats["neg_dropped_as_duplicate"] == 4
    assert out["neg_scores"].to_list() == [pytest.approx([0.6, 0.5]),
                                           pytest.approx([0.7, 0.6, 0.5])]  # fmt: skip
    assert out["neg_ranks"].to_list() == [[1, 2], [1, 2, 3]] and out["topic"].to_list() == [3, 5]


def test_id_rows_gives_the_joins_rows_and_checks_a_hash_hit_against_the_id():
    """The lookup the mine and batch stages use for doc and query rows: the rows a join gives
    (absent ids -1, repeats, any order); a hash hit whose id differs is a miss, and colliding
    keys fall back to the join."""
    from curate.records import IdRows, rows_of

    keys = pl.Series([f"d{i}" for i in range(1000)])
    want = [f"d{i}" for i in (5, 999, 5, 0)] + ["nope", "d1000"]
    index = IdRows(keys)
    assert index.exact and len(index) == 1000
    assert index(want).tolist() == rows_of(keys, want).tolist() == [5, 999, 5, 0, -1, -1]
    assert index([]).tolist() == []
    assert IdRows(pl.Series([], dtype=pl.String))(["a"]).tolist() == [-1]
    # A table where "nope" hashes to d7's row: the ids differ, so it is a miss.
    forged = IdRows(keys)
    forged.sorted = np.array([pl.Series(["nope"]).hash(IdRows.SEED)[0]], np.uint64)
    forged.order = np.array([7])
    assert forged(["nope"]).tolist() == [-1]
    forged.exact = False  # as when two keys share a hash: the join answers
    assert forged(["nope", "d7"]).tolist() == [-1, 7]
    # Looked up a few ids at a time (the driver's bound on a lookup's scratch): the same rows.
    many = [f"d{i}" for i in np.random.default_rng(0).integers(0, 1100, 5000)]
    chunked = IdRows(keys)
    chunked.CHUNK = 7
    assert chunked(many).tolist() == rows_of(keys, many).tolist() == index(many).tolist()
