"""Shard writer/reader: one row group per batch, fixed batches per file, atomic, reproducible."""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate import schema
from curate.shards import MANIFEST, iter_batches, read_manifest, write_json, write_shards

BATCH_SIZES = [2, 3, 1, 2, 2]  # 5 batches, 10 rows


def shard_table() -> pa.Table:
    batch_id = [b for b, n in enumerate(BATCH_SIZES) for _ in range(n)]
    n = len(batch_id)
    cols = {
        "batch_id": batch_id,
        "query_id": [f"q{i}" for i in range(n)],
        "query": [f"query {i}" for i in range(n)],
        "pos_id": [f"p{i}" for i in range(n)],
        "pos": [f"positive {i}" for i in range(n)],
        "pos_score": [0.5 + i / 100 for i in range(n)],
        "neg_ids": [[f"n{i}a", f"n{i}b"] for i in range(n)],
        "negs": [[f"neg {i}a", f"neg {i}b"] for i in range(n)],
        "neg_scores": [[0.4, 0.3] for _ in range(n)],
        "neg_ranks": [[1, 2] for _ in range(n)],
        "topic": [i % 2 for i in range(n)],
        "known_pos_ids": [[f"p{i}"] for i in range(n)],
    }
    return pa.table(cols, schema=schema.SHARD)


def write(out_dir, batches_per_shard=2):
    records = write_shards(shard_table(), out_dir, batches_per_shard)
    write_json(out_dir / MANIFEST, {"files": records})
    return records


def test_files_and_row_groups(tmp_path):
    records = write(tmp_path)
    names = ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    assert [r["path"] for r in records] == names
    assert [r["batches"] for r in records] == [2, 2, 1]
    assert [r["rows"] for r in records] == [5, 3, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names, MANIFEST])
    expected_groups = [[[0, 0], [1, 1, 1]], [[2], [3, 3]], [[4, 4]]]
    for rec, groups in zip(records, expected_groups, strict=True):
        path = tmp_path / rec["path"]
        assert rec["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        pf = pq.ParquetFile(path)
        got = [
            pf.read_row_group(g).column("batch_id").to_pylist() for g in range(pf.num_row_groups)
        ]
        assert got == groups
        assert pf.schema_arrow == schema.SHARD


def test_iter_batches_in_order_and_from_start(tmp_path):
    write(tmp_path)
    table = shard_table()
    got = list(iter_batches(tmp_path))
    assert [b for b, _ in got] == [0, 1, 2, 3, 4]
    for b, rows in got:
        assert rows.column("batch_id").to_pylist() == [b] * BATCH_SIZES[b]
    assert pa.concat_tables([t for _, t in got]).equals(table)
    assert [b for b, _ in iter_batches(tmp_path, start=3)] == [3, 4]
    assert [b for b, _ in iter_batches(tmp_path, start=2)] == [2, 3, 4]  # skips the first file
    resumed = dict(iter_batches(tmp_path, start=1))
    assert resumed[1].column("query_id").to_pylist() == ["q2", "q3", "q4"]
    assert list(iter_batches(tmp_path, start=5)) == []


def test_byte_identical_rewrite(tmp_path):
    first = write(tmp_path / "a")
    second = write(tmp_path / "b")
    assert first == second
    for rec in first:
        assert (tmp_path / "a" / rec["path"]).read_bytes() == (
            tmp_path / "b" / rec["path"]
        ).read_bytes()
    assert write(tmp_path / "a") == first  # rewriting in place too


def test_no_tmp_left_and_stale_shards_removed(tmp_path):
    write(tmp_path, batches_per_shard=1)
    assert len(list(tmp_path.glob("shard-*.parquet"))) == 5
    write(tmp_path, batches_per_shard=2)
    assert len(list(tmp_path.glob("shard-*.parquet"))) == 3
    assert list(tmp_path.rglob("*.tmp")) == []


def test_missing_manifest(tmp_path):
    write_shards(shard_table(), tmp_path, 2)  # shards but no manifest: an incomplete write
    with pytest.raises(FileNotFoundError, match="no manifest"):
        read_manifest(tmp_path)
    with pytest.raises(FileNotFoundError, match="no manifest"):
        next(iter_batches(tmp_path))


def test_rejects_table_without_shard_schema(tmp_path):
    with pytest.raises(ValueError, match="batch_id"):
        write_shards(shard_table().drop_columns(["batch_id"]), tmp_path, 2)
