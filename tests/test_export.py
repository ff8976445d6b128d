"""Exports load unchanged in their consumers: datasets, sentence-transformers (trained a few
steps with MNRL in curate's batch order), FlagEmbedding JSONL."""

from __future__ import annotations

import json

import pytest

from curate.config import config_from_dict
from curate.export import ShardOrderSampler, to_flagembedding, to_sentence_transformers
from curate.shards import iter_batches
from pipelines.run import run


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, cranfield, tiny_model):
    out = tmp_path_factory.mktemp("export-run")
    cfg = {
        "output_dir": str(out),
        "data": {"path": str(cranfield), "empty_text": "skip", "max_train_queries": 24},
        "embed": {"model": str(tiny_model), "max_length": 48, "partition_size": 700},
        "mine": {"top_k": 20, "num_negatives": 2, "range_max": 20, "max_relative": None},
        "batch": {"batch_size": 8},
        "train": {"enabled": False},
        "eval": {"enabled": False},
        "cluster": {"n_workers": 1},
    }
    run(config_from_dict(cfg))
    return out / "shards"


def _rows_in_order(shard_dir):
    return [r for _, t in iter_batches(shard_dir) for r in t.to_pylist()]


def test_datasets_loads_shard_folder_in_order(shard_dir):
    import datasets

    ds = datasets.load_dataset(
        "parquet", data_files=str(shard_dir / "shard-*.parquet"), split="train"
    )
    rows = _rows_in_order(shard_dir)
    assert ds.num_rows == len(rows)
    assert ds["query_id"] == [r["query_id"] for r in rows]
    assert ds["batch_id"] == sorted(ds["batch_id"])


def test_flagembedding_jsonl(shard_dir, tmp_path):
    counts = to_flagembedding(shard_dir, tmp_path / "fe.jsonl")
    lines = [json.loads(x) for x in (tmp_path / "fe.jsonl").read_text().splitlines()]
    rows = _rows_in_order(shard_dir)
    assert counts["rows"] == len(lines) == len(rows)
    assert set(lines[0]) == {"query", "pos", "neg", "pos_scores", "neg_scores"}
    assert lines[0]["query"] == rows[0]["query"] and lines[0]["neg"] == rows[0]["negs"]
    assert len(lines[0]["neg"]) == len(lines[0]["neg_scores"])


def test_sentence_transformers_trains_with_mnrl_in_batch_order(shard_dir, tmp_path, tiny_model):
    import datasets
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
        losses,
    )

    counts = to_sentence_transformers(shard_dir, tmp_path / "st", num_negatives=2)
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "st" / "train.parquet"), split="train")
    assert ds.column_names == ["anchor", "positive", "negative_1", "negative_2"]
    assert ds.num_rows == counts["rows"] > 0
    sampler = ShardOrderSampler.from_export(tmp_path / "st")
    batches = list(sampler(ds))
    assert [len(b) for b in batches] == sampler.batch_sizes
    assert [i for b in batches for i in b] == list(range(ds.num_rows))

    model = SentenceTransformer(str(tiny_model), device="cpu")
    model.max_seq_length = 32
    before = [p.detach().clone() for p in model.parameters()]
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "st-out"), max_steps=2, per_device_train_batch_size=8,
        learning_rate=1e-3, batch_sampler=sampler, report_to=[], save_strategy="no",
        use_cpu=True, logging_steps=1, dataloader_drop_last=False,
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=ds, loss=losses.MultipleNegativesRankingLoss(model)
    )
    trainer.train()
    assert trainer.state.global_step == 2
    assert any(not (a == b).all() for a, b in zip(before, model.parameters()))
