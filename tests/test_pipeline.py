"""The whole pipeline on a slice of Cranfield through a real 2-worker LocalCluster."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from slice_data import output_bytes

from curate import schema
from curate.batch.shards import read_manifest
from curate.config import config_from_dict
from pipelines.run import run


def _config(out: Path, data: Path, model: Path, **train) -> dict:
    return {
        "output_dir": str(out),
        "seed": 3,
        "data": {"path": str(data), "empty_text": "skip", "max_train_queries": 40},
        "embed": {"model": str(model), "max_length": 64, "partition_size": 400},
        # A random tiny BERT puts every text close together: loosen the filters that compare
        # scores so negatives survive (the filters have their own exact tests).
        "mine": {"top_k": 30, "num_negatives": 3, "range_max": 30, "max_relative": None,
                 "near_dup_threshold": 0.99999},
        "batch": {"batch_size": 8, "batches_per_shard": 4},
        "train": {"max_steps": 3, "max_length": 32, "checkpoint_every": 2, **train},
        "eval": {"max_queries": 20},
        "cluster": {"n_workers": 2, "threads_per_worker": 1},
    }


DIFFER_BY_DESIGN = ("output_dir", "cluster")  # config sections the compared runs do not share


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, cranfield, tiny_model):
    out = tmp_path_factory.mktemp("run-a")
    result = run(config_from_dict(_config(out, cranfield, tiny_model)))
    return out, result


def test_shards_pass_schema_and_invariants(first_run):
    out, result = first_run
    manifest = read_manifest(out / "shards")
    assert manifest["counts"]["train_pairs"] > 0
    seen_batches = set()
    for rec in manifest["files"]:
        pf = pq.ParquetFile(out / "shards" / rec["path"])
        table = pf.read()
        schema.check(table, schema.SHARD, rec["path"])
        assert pf.num_row_groups == rec["batches"]
        for g in range(pf.num_row_groups):
            rows = pf.read_row_group(g).to_pylist()
            (bid,) = {r["batch_id"] for r in rows}
            seen_batches.add(bid)
            docs = [r["pos_id"] for r in rows] + [n for r in rows for n in r["neg_ids"]]
            assert len(docs) == len(set(docs)), "a document appears twice in one batch"
            for r in rows:
                assert r["pos_id"] in r["known_pos_ids"]
                assert not set(r["neg_ids"]) & set(r["known_pos_ids"])
                assert len(r["negs"]) == len(r["neg_ids"]) == len(r["neg_scores"])
    assert seen_batches == set(range(len(seen_batches)))
    assert manifest["funnel"]["kept"] > 0
    funnel = manifest["funnel"]
    assert funnel["candidates"] == sum(v for k, v in funnel.items() if k != "candidates")
    assert set(result["eval"]) == {"base", "trained"}
    assert 0.0 <= result["eval"]["base"]["ndcg@10"] <= 1.0


def test_rerun_from_scratch_in_process_is_byte_identical(
    first_run, tmp_path, cranfield, tiny_model
):
    """A fresh run on one in-process worker (what a small corpus gets by default) writes the
    same bytes as the 2-process run: the tasks, not where they run, decide the output."""
    out, _ = first_run
    cfg = _config(tmp_path, cranfield, tiny_model)
    cfg["cluster"] = {"workers": "in_process"}
    run(config_from_dict(cfg))
    assert output_bytes(tmp_path, DIFFER_BY_DESIGN) == output_bytes(out, DIFFER_BY_DESIGN)
    from curate.embed.encoder import _ENCODERS

    assert not _ENCODERS  # the worker's model went with its cluster


def test_rerun_in_place_reuses_partitions_and_matches(first_run, cranfield, tiny_model):
    out, _ = first_run
    before = output_bytes(out, DIFFER_BY_DESIGN)
    cached = sorted(p.name for p in (out / "cache" / "docs").iterdir())
    run(config_from_dict(_config(out, cranfield, tiny_model)))
    assert sorted(p.name for p in (out / "cache" / "docs").iterdir()) == cached
    assert output_bytes(out, DIFFER_BY_DESIGN) == before
    assert not list(out.rglob("*.tmp"))


@pytest.mark.parametrize(
    ("cluster", "texts", "want"),
    [
        ({}, 1_000, True),  # small: no process start-up, one model in memory
        ({}, 60_000, False),
        ({}, None, False),  # size unknown: processes
        ({"n_workers": 2}, 1_000, False),  # asked for workers: processes
        ({"workers": "in_process"}, 10**7, True),
        ({"workers": "processes"}, 10, False),
        ({"in_process_max": 100}, 101, False),
    ],
)
def test_in_process_worker_choice(cluster, texts, want):
    from curate.config import ClusterConfig
    from pipelines.cluster import in_process

    assert in_process(ClusterConfig(**cluster), texts) is want
