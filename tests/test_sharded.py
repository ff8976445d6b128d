"""A sharded flat index mines exactly what one flat index mines, end to end on Cranfield through a
real 2-worker LocalCluster: one index per contiguous shard, a search task per (query block,
shard), per-shard hits merged to the global top-k, then the same filters."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.config import config_from_dict
from pipelines.run import run


def _config(out: Path, cache: Path, data: Path, model: Path, shards: int) -> dict:
    return {
        "output_dir": str(out),
        "cache_dir": str(cache),  # shared: the second run embeds nothing
        "seed": 5,
        "data": {"path": str(data), "empty_text": "skip", "max_train_queries": 40},
        "embed": {"model": str(model), "max_length": 64, "partition_size": 700},
        "index": {"factory": "Flat", "shards": shards},
        # 16 queries per block -> 3 blocks x `shards` search tasks. A random tiny BERT puts every
        # text close together: loosen the score filters so negatives survive.
        "mine": {
            "top_k": 30,
            "num_negatives": 3,
            "range_max": 30,
            "max_relative": None,
            "near_dup_threshold": 0.99999,
            "query_partition": 16,
        },
        "batch": {"batch_size": 8, "batches_per_shard": 4},
        "train": {"enabled": False},
        "eval": {"enabled": False},
        "cluster": {"n_workers": 2, "threads_per_worker": 1},
    }


def _mined(out: Path) -> pa.Table:
    parts = [
        pq.read_table(p)
        for p in sorted((out / "work" / "mined").glob("*.parquet"))
        if not p.name.endswith(".forbidden.parquet")
    ]
    table = pa.concat_tables([t.replace_schema_metadata(None) for t in parts])
    return table.sort_by([("query_id", "ascending"), ("pos_id", "ascending")])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cranfield, tiny_model):
    root = tmp_path_factory.mktemp("sharded")
    results = {}
    for shards in (1, 3):
        out = root / f"shards-{shards}"
        results[shards] = run(
            config_from_dict(_config(out, root / "cache", cranfield, tiny_model, shards))
        )
    return root, results


def test_sharded_flat_mines_the_same_negatives_as_one_flat_index(runs):
    root, results = runs
    one, three = root / "shards-1", root / "shards-3"
    assert len(list((three / "work").glob("index.shard-*-of-00003.faiss"))) == 3
    assert not (three / "work" / "index.faiss").exists()
    a, b = _mined(one), _mined(three)
    assert a.num_rows > 0
    assert a.to_pylist() == b.to_pylist()
    assert results[1]["manifest"]["funnel"] == results[3]["manifest"]["funnel"]
    # What the trainer reads is byte-identical too.
    for name in ["forbidden.parquet", *(p.name for p in (one / "shards").glob("*.parquet"))]:
        folder = "" if name == "forbidden.parquet" else "shards"
        assert (one / folder / name).read_bytes() == (three / folder / name).read_bytes(), name


def test_sharded_run_records_the_shards_in_the_recall_record(runs):
    _, results = runs
    rec = results[3]["manifest"]["index_recall"]
    assert rec["exact"] and rec["shards"] == 3 and rec["k"] == 30
