"""Forbidden pairs and exact duplicates: the shards name a document by its canonical id (the
smallest id of its text), so a pair rejected while mining must reach the trainer's mask under
that id too, even when the canonical copy itself was never among the query's candidates."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from curate import schema
from curate.batch import dedup
from curate.batch.shards import iter_batches, read_manifest
from curate.batch.stage import curate
from curate.config import config_from_dict
from curate.read.dataset import Dataset
from curate.records import Embedded, Mined, Read
from train.train import batch_columns, batch_masks, load_forbidden

# "a" and "b" are the same text (case and punctuation aside): "a" is the canonical id.
DOCS = {
    "a": "Shock waves in hypersonic flow.",
    "b": "shock waves in hypersonic flow",
    "c": "boundary layer transition on a flat plate",
    "e": "heat transfer to a blunt body",
    "f": "buckling of thin cylindrical shells",
    "g": "flutter of swept wings",
}


def _records(tmp_path):
    """Stage 5 on hand-made mining output: q1 (positive c) had "b" rejected as a likely false
    negative, while its twin "a" was cut at top_k and so never judged for q1; q2 (positive f)
    mines "a" as a negative, which puts column "a" in the batch both rows share."""
    corpus = dedup.add_text_hash(
        pl.DataFrame({"doc_id": list(DOCS), "title": [""] * len(DOCS), "text": list(DOCS.values())})
    )
    canon_df = dedup.canonical_ids(corpus)
    assert dict(zip(canon_df["doc_id"], canon_df["canonical_id"]))["b"] == "a"
    queries = pl.DataFrame({"query_id": ["q1", "q2"], "text": ["shock waves?", "shell buckling?"]})
    ds = Dataset(corpus=corpus, queries=queries, qrels={}, stats={})
    mined = pa.table(
        {"query_id": ["q1", "q2"], "pos_id": ["c", "f"], "pos_score": [0.9, 0.9],
         "neg_ids": [["e"], ["a", "g"]], "neg_scores": [[0.5], [0.6, 0.4]],
         "neg_ranks": [[3], [1, 2]]},
        schema=schema.MINED,
    )  # fmt: skip
    forbidden = pa.table(
        {"query_id": ["q1", "q1"], "doc_id": ["b", "a"], "reason": ["near_duplicate"] * 2,
         "score": [0.95, 0.95]},
        schema=schema.FORBIDDEN,
    ).slice(0, 1)  # only "b": "a" was not a candidate of q1
    cfg = config_from_dict(
        {"output_dir": str(tmp_path), "mine": {"num_negatives": 2, "spare_negatives": 0},
         "batch": {"batch_size": 2, "batches_per_shard": 1}}
    )  # fmt: skip
    funnel = {"candidates": 4, "near_duplicate": 1, "kept": 3}
    known = {"q1": ["c"], "q2": ["f"]}
    read = Read(ds, corpus, list(DOCS.values()), pl.DataFrame(), known)
    emb = Embedded(list(DOCS), np.zeros((len(DOCS), 2), np.float32), ["q1", "q2"],
                   np.eye(2, dtype=np.float32))  # fmt: skip
    return cfg, read, emb, Mined(mined, forbidden, funnel, known, cfg.mine, None, {})


def _curate(tmp_path):
    cfg, read, emb, mined = _records(tmp_path)
    curate(cfg, tmp_path, read, emb, mined)
    return tmp_path / "shards"


def test_the_pipeline_stage_writes_what_curate_writes(tmp_path):
    """pipelines.stages.curate_stage composes in a worker task from the files the index stage
    leaves (ids, text hashes, texts, vectors) and the inputs it writes, and runs the shard tasks
    from the task's plan: the same shards, forbidden pairs and manifest as ``curate`` over the
    records in this process, and none of its scaffolding left behind."""
    from curate.config import ClusterConfig
    from curate.index.stage import write_inputs
    from pipelines.cluster import connect
    from pipelines.stages import curate_stage

    cfg, read, emb, mined = _records(tmp_path)
    curate(cfg, tmp_path / "here", read, emb, mined)
    work = tmp_path / "staged" / "work"
    work.mkdir(parents=True)
    write_inputs(work, read, emb)
    with connect(ClusterConfig(workers="in_process"), quiet=True) as workers:
        got = curate_stage(workers, cfg, tmp_path / "staged", read, emb, mined, work)

    def files(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
                if p.is_file() and "work" not in p.parts}  # fmt: skip

    assert files(tmp_path / "staged") == files(tmp_path / "here")
    assert got.summary["counts"]["forbidden_pairs"] == 1
    assert sorted(p.name for p in work.iterdir()) == ["doc_hash.npy", "doc_ids.arrow",
                                                      "doc_texts.arrow", "doc_vecs.npy"]


def test_forbidden_pairs_are_written_under_canonical_ids(tmp_path):
    shard_dir = _curate(tmp_path)
    rec = read_manifest(shard_dir)["forbidden"]
    written = pq.read_table(shard_dir / rec["path"]).to_pylist()
    assert [(r["query_id"], r["doc_id"]) for r in written] == [("q1", "a")]
    assert read_manifest(shard_dir)["counts"]["forbidden_pairs"] == 1


def test_trainer_masks_the_canonical_column_of_a_forbidden_duplicate(tmp_path):
    shard_dir = _curate(tmp_path)
    (_, table), = list(iter_batches(shard_dir))
    rows = pl.from_arrow(table)
    _, _, col_ids, known, rejected = batch_columns(rows, load_forbidden(shard_dir))
    assert "a" in col_ids and "b" not in col_ids  # the shards carry the canonical id only
    from curate.config import TrainConfig

    mask, _ = batch_masks(TrainConfig(), col_ids, known, rejected)
    q1, q2 = rows["query_id"].to_list().index("q1"), rows["query_id"].to_list().index("q2")
    col_a = col_ids.index("a")
    assert mask[q1, col_a]  # rejected for q1 under its twin's id: still out of q1's denominator
    assert not mask[q2, col_a]  # q2's own negative stays in
