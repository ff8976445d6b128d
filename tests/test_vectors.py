"""Bring your own embeddings (issue #15 item 3): a vector column in the corpus and queries Parquet
files replaces the embed stage; bad vectors fail with the file and the row named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.errors import DataError

DIM = 16


def _write(folder: Path, n_docs: int = 120, n_queries: int = 40, seed: int = 0,
           row_group: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """A BEIR folder with Parquet corpus/queries carrying raw (not unit) vectors in "emb", topics
    so mining has structure, one positive per query; -> (doc vectors, query vectors) as written."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, DIM))
    topic = rng.integers(0, 6, n_docs)
    scale = rng.uniform(0.5, 3, (n_docs, 1))  # not unit: curate normalises
    docs = (centres[topic] + 0.4 * rng.normal(size=(n_docs, DIM))) * scale
    pos = rng.choice(n_docs, n_queries, replace=False)
    queries = docs[pos] + 0.2 * rng.normal(size=(n_queries, DIM))
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]

    def vec_col(m: np.ndarray) -> pa.Array:
        return pa.array(m.astype(np.float32).tolist(), pa.list_(pa.float32()))

    corpus = pa.table({
        "_id": [f"d{i}" for i in range(n_docs)], "title": [""] * n_docs,
        "text": [f"{words[t]} document {i} about {words[t]} things" for i, t in enumerate(topic)],
        "emb": vec_col(docs),
    })  # fmt: skip
    pq.write_table(corpus, folder / "corpus.parquet", row_group_size=row_group)
    qtab = pa.table({"_id": [f"q{i}" for i in range(n_queries)],
                     "text": [f"query {i}" for i in range(n_queries)], "emb": vec_col(queries)})
    pq.write_table(qtab, folder / "queries.parquet", row_group_size=row_group)
    (folder / "qrels").mkdir()
    lines = ["query-id\tcorpus-id\tscore"] + [f"q{i}\td{p}\t1" for i, p in enumerate(pos)]
    (folder / "qrels" / "train.tsv").write_text("\n".join(lines) + "\n")
    return docs, queries


def _config(data: Path, out: Path, vector: str = "emb", **data_keys):
    from curate.config import config_from_dict

    return config_from_dict({
        "output_dir": str(out), "seed": 0,
        "data": {"path": str(data), "eval_split": None, "columns": {"vector": vector},
                 **data_keys},
        "mine": {"num_negatives": 3, "spare_negatives": 2, "top_k": 30, "range_max": 30},
        "batch": {"batch_size": 8},
        "train": {"enabled": False}, "eval": {"enabled": False},
        "cluster": {"workers": "in_process"},
    })  # fmt: skip


def _unit(m: np.ndarray) -> np.ndarray:
    m = m.astype(np.float32)
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def test_given_vectors_are_indexed_and_mined_without_embedding(tmp_path):
    import curate

    data = tmp_path / "data"
    data.mkdir()
    docs, queries = _write(data)
    out = tmp_path / "run"
    result = curate.run(_config(data, out), quiet=True)
    # the index was built from the given vectors, unit length, in corpus order
    np.testing.assert_allclose(np.load(out / "work" / "doc_vecs.npy"), _unit(docs), atol=1e-6)
    assert not list((out / "cache").glob("docs/*.parquet")), "the embed stage ran"
    # every score in the shards is the cosine of the given vectors: rows line up end to end
    table = pq.read_table(out / "shards").to_pylist()
    assert len(table) == 40 and result["manifest"]["counts"]["rows"] == 40
    d, q = _unit(docs), _unit(queries)
    for row in table:
        qv = q[int(row["query_id"][1:])]
        assert abs(row["pos_score"] - qv @ d[int(row["pos_id"][1:])]) < 1e-4
        for n, s in zip(row["neg_ids"], row["neg_scores"]):
            assert abs(s - qv @ d[int(n[1:])]) < 1e-4
    assert sum(len(r["neg_ids"]) for r in table) > 0
    # where the driver's memory went: its peak after each stage, in MB
    assert result["driver_peak_mb"].keys() == result["timings"].keys()
    assert all(mb > 0 for mb in result["driver_peak_mb"].values())
    # a rerun reads nothing again: the joined vectors are cached by file
    cached = sorted(p.name for p in (out / "cache" / "given").iterdir())
    curate.run(_config(data, out, empty_text="error"), quiet=True)
    assert sorted(p.name for p in (out / "cache" / "given").iterdir()) == cached


def test_rows_skipped_for_empty_text_keep_vectors_aligned(tmp_path):
    import curate

    data = tmp_path / "data"
    data.mkdir()
    docs, _ = _write(data)
    t = pq.read_table(data / "corpus.parquet")
    texts = t.column("text").to_pylist()
    texts[7] = "  "  # skipped by data.empty_text: skip; d7 must not shift the rows after it
    t = t.set_column(t.column_names.index("text"), "text", pa.array(texts))
    pq.write_table(t, data / "corpus.parquet", row_group_size=25)
    qrels = (data / "qrels" / "train.tsv").read_text().splitlines()
    (data / "qrels" / "train.tsv").write_text("\n".join(r for r in qrels if "\td7\t" not in r))
    out = tmp_path / "run"
    curate.run(_config(data, out, empty_text="skip"), quiet=True)
    want = np.delete(_unit(docs), 7, axis=0)
    np.testing.assert_allclose(np.load(out / "work" / "doc_vecs.npy"), want, atol=1e-6)


def _break(data: Path, name: str, row: int, value) -> None:
    t = pq.read_table(data / name)
    vecs = t.column("emb").to_pylist()
    vecs[row] = value
    t = t.set_column(t.column_names.index("emb"), "emb", pa.array(vecs, pa.list_(pa.float32())))
    pq.write_table(t, data / name, row_group_size=25)


@pytest.mark.parametrize(
    "name, row, value, words",
    [
        ("corpus.parquet", 53, [float("nan")] * DIM, "NaN or inf"),
        ("corpus.parquet", 31, [1.0] * (DIM - 1), f"has {DIM - 1} values where rows have {DIM}"),
        ("corpus.parquet", 60, [0.0] * DIM, "all zeros"),
        ("queries.parquet", 12, None, "is null"),
    ],
)
def test_bad_vectors_name_the_file_and_row(tmp_path, name, row, value, words):
    import curate

    data = tmp_path / "data"
    data.mkdir()
    _write(data)
    _break(data, name, row, value)
    with pytest.raises(DataError) as err:
        curate.run(_config(data, tmp_path / "run"), quiet=True)
    assert err.value.row == row and err.value.file.endswith(name), err.value
    assert words in str(err.value) and "Fix:" in str(err.value)


def test_query_and_doc_dimensions_must_agree(tmp_path):
    import curate

    data = tmp_path / "data"
    data.mkdir()
    _write(data)
    t = pq.read_table(data / "queries.parquet")
    short = pa.array([v[:-2] for v in t.column("emb").to_pylist()], pa.list_(pa.float32()))
    pq.write_table(t.set_column(2, "emb", short), data / "queries.parquet")
    with pytest.raises(DataError, match=f"{DIM - 2} dimensions, the corpus's {DIM}"):
        curate.run(_config(data, tmp_path / "run"), quiet=True)


def test_schema_problems_fail_before_any_work(tmp_path):
    import curate

    data = tmp_path / "data"
    data.mkdir()
    _write(data)
    with pytest.raises(DataError, match="no vector column 'vec'.*found"):
        curate.run(_config(data, tmp_path / "a", vector="vec"), quiet=True)
    t = pq.read_table(data / "corpus.parquet")
    ints = pa.array([[1] * DIM] * t.num_rows, pa.list_(pa.int64()))
    pq.write_table(t.set_column(3, "emb", ints), data / "corpus.parquet")
    with pytest.raises(DataError, match=r"list<\w+: int64>"):
        curate.run(_config(data, tmp_path / "b"), quiet=True)
    jsonl = data / "corpus.jsonl"
    jsonl.write_text(json.dumps({"_id": "d0", "text": "x"}) + "\n")
    with pytest.raises(DataError, match="is not Parquet"):
        curate.run(_config(data, tmp_path / "c", corpus=str(jsonl)), quiet=True)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_a_rerun_after_a_crash_reads_only_the_blocks_not_done(tmp_path):
    """Each block's task marks itself done after filling its rows of the file-order array; a
    rerun submits only the others, and the result is the same."""
    from curate.config import ClusterConfig
    from curate.read import vectors
    from curate.text import content_hash
    from pipelines.cluster import connect
    from pipelines.embedding import given_vectors

    data = tmp_path / "data"
    data.mkdir()
    docs, _ = _write(data, n_docs=100, row_group=20)  # 5 row groups, a task each
    path, ids, cache = data / "corpus.parquet", [f"d{i}" for i in range(100)], tmp_path / "c"
    with connect(ClusterConfig(workers="in_process"), quiet=True) as workers:
        first = np.array(given_vectors(workers, str(path), "_id", "emb", ids, cache, 20))
        (joined,) = cache.glob("given-*.npy")  # no row skipped: the file-order array, renamed
        # As a run that died after 3 of the 5 blocks leaves it: the file-order array (here
        # with all rows; the rerun overwrites the 2 unmarked blocks) and 3 done-marks.
        st = path.stat()
        key = content_hash([str(path.resolve()), str(st.st_size), str(st.st_mtime_ns), "emb"])
        rows_file = cache / f"given-{key}.file-order.npy"
        joined.rename(rows_file)
        for row in (0, 20, 40):
            pq.write_table(pa.table({"id": ids[row : row + 20]}),
                           vectors.block_ids(str(rows_file), row))  # fmt: skip
        submit, keys = workers.client.submit, []
        workers.client.submit = lambda fn, *a, **kw: keys.append(kw["key"]) or submit(fn, *a, **kw)
        again = np.array(given_vectors(workers, str(path), "_id", "emb", ids, cache, 20))
    assert sorted(k for k in keys if k.startswith(f"vectors-{key}-")) == [
        f"vectors-{key}-3", f"vectors-{key}-4"]  # fmt: skip
    np.testing.assert_array_equal(again, first)
    np.testing.assert_allclose(first, _unit(docs), atol=1e-6)
    assert sorted(p.name for p in cache.iterdir()) == [joined.name]  # no scaffolding left


def test_semantic_duplicates_merge_under_the_canonical_id(tmp_path):
    """dedup.semantic_threshold: a doc whose vector is another's (its text differs) is merged
    into the smaller id, and the shards name only that one; an exact text twin merges too."""
    import curate
    from curate.config import config_from_dict

    data = tmp_path / "data"
    data.mkdir()
    _write(data)
    t = pq.read_table(data / "corpus.parquet")
    vecs, texts = t.column("emb").to_pylist(), t.column("text").to_pylist()
    vecs[11] = [2 * v for v in vecs[10]]  # d11: d10's direction, its own text
    texts[13] = texts[12]  # d13: d12's text, its own vector
    t = t.set_column(t.column_names.index("emb"), "emb", pa.array(vecs, pa.list_(pa.float32())))
    t = t.set_column(t.column_names.index("text"), "text", pa.array(texts))
    pq.write_table(t, data / "corpus.parquet", row_group_size=25)
    lines = (data / "qrels" / "train.tsv").read_text().splitlines()
    lines[1:3] = ["q0\td11\t1", "q1\td13\t1"]  # the duplicates as positives
    (data / "qrels" / "train.tsv").write_text("\n".join(lines) + "\n")
    tree = _config(data, tmp_path / "run").to_dict()
    tree["dedup"] = {"semantic_threshold": 0.999, "clusters": 1}
    result = curate.run(config_from_dict(tree), quiet=True)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["dedup"]["exact_duplicates"] == 1
    assert manifest["dedup"]["semantic_duplicates"] >= 1
    assert any(e["doc_id"] == "d11" and e["canonical_id"] == "d10"
               for e in manifest["dedup"]["semantic_examples"])  # fmt: skip
    assert result["manifest"]["counts"]["duplicate_docs"] >= 2
    ids = {i for row in pq.read_table(tmp_path / "run" / "shards").to_pylist()
           for i in [row["pos_id"], *row["neg_ids"], *row["known_pos_ids"]]}  # fmt: skip
    assert not ids & {"d11", "d13"}
    rows = pq.read_table(tmp_path / "run" / "shards").to_pylist()
    pos = {r["query_id"]: r["pos_id"] for r in rows}
    assert (pos["q0"], pos["q1"]) == ("d10", "d12")  # named by their canonical ids
