"""Every count a user reads is computed from what was written: a pipeline run on a Cranfield
slice (with exact copies of some documents, a shallow search that leaves rows short, and
drop_last) checked against its shards and forbidden pairs read back with pyarrow, and the
funnel checked to reconcile down to the negatives in the shards."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from slice_data import pipeline_config, write_slice

from curate.batch.shards import read_manifest
from curate.config import config_from_dict
from pipelines.run import run

NUM_NEGATIVES = 4


@pytest.fixture(scope="module")
def written(tmp_path_factory, cranfield, tiny_model):
    root = tmp_path_factory.mktemp("counts")
    data = write_slice(root / "data", cranfield)
    # Exact copies under ids that sort after the originals: canonical ids fold them back, so a
    # row that mined both copies of one text loses one (dropped_as_duplicate).
    docs = [json.loads(line) for line in (data / "corpus.jsonl").read_text().splitlines()]
    with open(data / "corpus.jsonl", "a") as fh:
        for d in docs[:60]:
            fh.write(json.dumps({**d, "_id": f"zz-copy-{d['_id']}"}) + "\n")
    cfg = pipeline_config(
        root / "out", data, tiny_model, cluster={"workers": "in_process"},
        # A shallow search where known positives take places: some rows end short or empty.
        mine={"top_k": 8, "range_max": 8, "num_negatives": NUM_NEGATIVES, "spare_negatives": 2},
        batch={"drop_last": True},
    )  # fmt: skip
    result = run(config_from_dict(cfg), quiet=True)
    shard_dir = root / "out" / "shards"
    manifest = read_manifest(shard_dir)
    table = pa.concat_tables(pq.read_table(shard_dir / f["path"]) for f in manifest["files"])
    return result, manifest, table, shard_dir


def test_counts_are_those_of_the_shards(written):
    result, manifest, table, shard_dir = written
    counts = manifest["counts"]
    lens = pc.list_value_length(table.column("neg_ids")).to_pylist()
    assert counts["rows"] == table.num_rows == len(lens)
    assert counts["negatives"] == sum(lens)
    assert counts["rows_without_negatives"] == sum(n == 0 for n in lens)
    assert counts["rows_short_of_negatives"] == sum(n < NUM_NEGATIVES for n in lens)
    # The run exercises each count (else the checks above prove little).
    assert 0 < counts["rows_without_negatives"] < counts["rows_short_of_negatives"] < len(lens)
    forbidden = pq.read_table(shard_dir / manifest["forbidden"]["path"])
    assert counts["forbidden_pairs"] == forbidden.num_rows
    assert counts["train_pairs"] - counts["rows_dropped_last"] == table.num_rows
    assert result["manifest"]["counts"] == counts  # report.json says the same


def test_funnel_reconciles_down_to_the_shards(written):
    result, manifest, table, _ = written
    funnel = manifest["funnel"]
    negatives = sum(pc.list_value_length(table.column("neg_ids")).to_pylist())
    assert funnel["kept"] == negatives  # the last bucket is what a trainer gets
    assert funnel["candidates"] == sum(v for k, v in funnel.items() if k != "candidates")
    for reason in ("dropped_as_duplicate", "dropped_last", "spare_unused"):
        assert funnel[reason] > 0, reason
    assert funnel["dropped_in_batch"] == manifest["counts"]["neg_dropped_in_batch"]
    # As mined: every candidate was dropped for a reason, kept or kept as a spare.
    mined = manifest["mining_funnel"]
    assert mined["candidates"] == sum(v for k, v in mined.items() if k != "candidates")
    assert result["manifest"]["funnel"] == funnel
