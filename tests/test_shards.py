"""Shard writer/reader: one row group per batch, fixed batches per file, atomic, reproducible."""

from __future__ import annotations

import hashlib
import json

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate import schema
from curate.batch.shards import (
    MANIFEST,
    iter_batches,
    manifest_path,
    read_manifest,
    write_manifest,
    write_shards,
)
from curate.errors import CurateError

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
    write_manifest(out_dir, {"files": records})
    return records


@pytest.fixture
def shard_dir(tmp_path):
    """The shard folder of a run folder (the manifest goes beside it, in the run folder)."""
    return tmp_path / "run" / "shards"


def test_files_and_row_groups(shard_dir):
    records = write(shard_dir)
    names = ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    assert [r["path"] for r in records] == names
    assert [r["batches"] for r in records] == [2, 2, 1]
    assert [r["rows"] for r in records] == [5, 3, 2]
    assert sorted(p.name for p in shard_dir.iterdir()) == names  # parquet only: loads as a table
    assert manifest_path(shard_dir) == shard_dir.parent / MANIFEST
    assert read_manifest(shard_dir) == {"files": records}
    expected_groups = [[[0, 0], [1, 1, 1]], [[2], [3, 3]], [[4, 4]]]
    for rec, groups in zip(records, expected_groups, strict=True):
        path = shard_dir / rec["path"]
        assert rec["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        pf = pq.ParquetFile(path)
        got = [
            pf.read_row_group(g).column("batch_id").to_pylist() for g in range(pf.num_row_groups)
        ]
        assert got == groups
        assert pf.schema_arrow == schema.SHARD


def test_iter_batches_in_order_and_from_start(shard_dir):
    write(shard_dir)
    table = shard_table()
    got = list(iter_batches(shard_dir))
    assert [b for b, _ in got] == [0, 1, 2, 3, 4]
    for b, rows in got:
        assert rows.column("batch_id").to_pylist() == [b] * BATCH_SIZES[b]
    assert pa.concat_tables([t for _, t in got]).equals(table)
    assert [b for b, _ in iter_batches(shard_dir, start=3)] == [3, 4]
    assert [b for b, _ in iter_batches(shard_dir, start=2)] == [2, 3, 4]  # skips the first file
    resumed = dict(iter_batches(shard_dir, start=1))
    assert resumed[1].column("query_id").to_pylist() == ["q2", "q3", "q4"]
    assert list(iter_batches(shard_dir, start=5)) == []


def test_byte_identical_rewrite(tmp_path):
    a, b = tmp_path / "a" / "shards", tmp_path / "b" / "shards"
    first = write(a)
    second = write(b)
    assert first == second
    for rec in first:
        assert (a / rec["path"]).read_bytes() == (b / rec["path"]).read_bytes()
    assert write(a) == first  # rewriting in place too


def test_no_tmp_left_and_stale_shards_removed(shard_dir):
    write(shard_dir, batches_per_shard=1)
    assert len(list(shard_dir.glob("shard-*.parquet"))) == 5
    write(shard_dir, batches_per_shard=2)
    assert len(list(shard_dir.glob("shard-*.parquet"))) == 3
    assert list(shard_dir.rglob("*.tmp")) == []


def test_missing_manifest(shard_dir):
    write_shards(shard_table(), shard_dir, 2)  # shards but no manifest: an incomplete write
    with pytest.raises(FileNotFoundError, match="no manifest"):
        read_manifest(shard_dir)
    with pytest.raises(FileNotFoundError, match="no manifest"):
        next(iter_batches(shard_dir))


def test_shard_folder_loads_as_one_table_in_every_reader(shard_dir):
    import datasets
    import pandas as pd
    import polars as pl

    write(shard_dir)
    want = shard_table().column("query_id").to_pylist()  # file order, row-group order
    assert pq.read_table(shard_dir).column("query_id").to_pylist() == want
    assert pd.read_parquet(shard_dir)["query_id"].tolist() == want
    assert pl.read_parquet(shard_dir)["query_id"].to_list() == want
    ds = datasets.load_dataset("parquet", data_dir=str(shard_dir), split="train")
    assert ds["query_id"] == want


def test_old_manifest_inside_the_shard_folder_says_rerun(shard_dir):
    records = write_shards(shard_table(), shard_dir, 2)
    (shard_dir / MANIFEST).write_text(json.dumps({"files": records}))  # an older curate's layout
    with pytest.raises(FileNotFoundError, match="rerun `curate batch`"):
        read_manifest(shard_dir)
    with pytest.raises(CurateError, match="rerun `curate batch`"):
        read_manifest(shard_dir, missing_ok=True)
    assert read_manifest(shard_dir.parent / "elsewhere", missing_ok=True) is None
    write(shard_dir)  # a rerun in place moves it out of the folder
    assert sorted(p.name for p in shard_dir.iterdir() if not p.name.startswith("shard-")) == []


def test_rejects_table_without_shard_schema(shard_dir):
    with pytest.raises(ValueError, match="batch_id"):
        write_shards(shard_table().drop_columns(["batch_id"]), shard_dir, 2)


def _by_number(full):
    """The shard table as shard_table leaves it (doc numbers, no ids or texts) -> (that table
    with its query texts (text_rows), the doc ids and texts by number, the known positives)."""
    from curate.batch.curation import TEXT_COLUMNS, TextColumn, text_rows
    from curate.records import rows_of

    flat = {c: full[c].combine_chunks().flatten().to_pylist() for c in ("neg_ids", "negs")}
    text = dict(zip([*full["pos_id"].to_pylist(), *flat["neg_ids"]],
                    [*full["pos"].to_pylist(), *flat["negs"]]))  # fmt: skip
    ids = pl.Series(sorted(text), dtype=pl.String)
    negs = full["neg_ids"].combine_chunks()
    plain = full.drop_columns(list(TEXT_COLUMNS)).append_column(
        "pos_row", pa.array(rows_of(ids, full["pos_id"].to_pylist()))
    ).append_column("neg_rows", pa.ListArray.from_arrays(
        negs.offsets, pa.array(rows_of(ids, negs.flatten().to_pylist()))))  # fmt: skip
    queries = TextColumn(full["query_id"].to_pylist(), full["query"].to_pylist())
    known = pl.DataFrame({"query_id": full["query_id"].to_pylist(),
                          "known_pos_ids": full["known_pos_ids"].to_pylist()}).unique("query_id")
    return text_rows(plain, queries), ids, [text[d] for d in ids], known


def test_texts_filled_shard_by_shard_write_the_same_bytes(tmp_path):
    """The batch stage builds no table of every text: ``fill`` adds the ids and texts to one
    shard's rows at a time, by doc number (with the known positives), and the files are the
    bytes of the whole table written at once."""
    from curate.batch.curation import with_row_texts

    full = shard_table()
    rows, ids, texts, known = _by_number(full)
    seen = []

    def fill(part):
        seen.append(part.num_rows)
        return with_row_texts(part, pa.array(texts), ids.to_arrow(), known)

    whole = write_shards(full, tmp_path / "a", 2)
    streamed = write_shards(rows, tmp_path / "b", 2, fill=fill)
    assert [r["sha256"] for r in streamed] == [r["sha256"] for r in whole]
    assert seen == [5, 3, 2]  # batches of 2+3, 1+2, 2 rows: one call per shard


def test_shards_written_by_tasks_from_row_numbers_are_the_same_bytes(tmp_path):
    """The cluster path: the rows staged with their docs' row numbers, each shard written by a
    task that reads the texts from the memory-mapped corpus text file and is renamed into
    place by the driver. Same bytes as the whole table written at once, nothing left over."""
    from curate.batch.stage import Staged
    from curate.mine.negatives import write_doc_ids, write_doc_texts

    full = shard_table()
    rows, ids, texts, known = _by_number(full)
    work = tmp_path / "run" / "work"
    work.mkdir(parents=True)
    write_doc_texts(work / "doc_texts.arrow", texts)
    write_doc_ids(work / "doc_ids.arrow", ids)
    staged = Staged.write_new(work / "shards-staging", rows, known)
    calls = []

    def run(fn, args, label):  # one process: the pipeline tests run these on a cluster
        calls.append(len(args))
        return [fn(*a) for a in args]

    whole = write_shards(full, tmp_path / "a", 2)
    by_tasks = write_shards(rows, tmp_path / "c", 2, write_many=lambda j: staged.write(j, run))
    assert [r["sha256"] for r in by_tasks] == [r["sha256"] for r in whole]
    assert calls == [3] and sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        r["path"] for r in whole]  # fmt: skip
