"""Exports load unchanged in their consumers: the shard folder in pyarrow, pandas, polars and
datasets; sentence-transformers (trained a step with MNRL in curate's batch order); FlagEmbedding
JSONL. Rows short of the run's ``mine.num_negatives`` are dropped or filled, and counted."""

from __future__ import annotations

import json
import math
import random

import pyarrow as pa
import pytest

from curate import schema
from curate.batch.export import ShardOrderSampler, to_flagembedding, to_sentence_transformers
from curate.batch.shards import MANIFEST, iter_batches, read_manifest, write_manifest, write_shards
from curate.config import config_from_dict
from curate.errors import CurateError
from pipelines import cli
from pipelines.run import run

NUM_NEGATIVES = 2


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cranfield, tiny_model):
    out = tmp_path_factory.mktemp("export-run")
    cfg = {
        "output_dir": str(out),
        "data": {"path": str(cranfield), "empty_text": "skip", "max_train_queries": 24},
        "embed": {"model": str(tiny_model), "max_length": 48, "partition_size": 700},
        "mine": {"top_k": 20, "num_negatives": NUM_NEGATIVES, "range_max": 20,
                 "max_relative": None},
        "batch": {"batch_size": 8},
        "train": {"enabled": False},
        "eval": {"enabled": False},
        "cluster": {"workers": "in_process"},  # the cluster stages have their own tests
    }  # fmt: skip
    run(config_from_dict(cfg))
    return out


@pytest.fixture(scope="module")
def shard_dir(run_dir):
    return run_dir / "shards"


def _rows_in_order(shard_dir):
    return [r for _, t in iter_batches(shard_dir) for r in t.to_pylist()]


def _small_run(root, neg_counts, batch_size=2):
    """Shards whose row i has ``neg_counts[i]`` negatives, in a run of num_negatives 2."""
    rows = [{"batch_id": i // batch_size, "query_id": f"q{i}", "query": f"question {i}",
             "pos_id": f"p{i}", "pos": f"answer {i}", "pos_score": 0.9,
             "neg_ids": [f"n{i}.{j}" for j in range(k)],
             "negs": [f"other {i}.{j}" for j in range(k)],
             "neg_scores": [0.5 - j / 10 for j in range(k)], "neg_ranks": list(range(1, k + 1)),
             "topic": 0, "known_pos_ids": [f"p{i}"]}
            for i, k in enumerate(neg_counts)]  # fmt: skip
    shard_dir = root / "shards"
    files = write_shards(pa.Table.from_pylist(rows, schema=schema.SHARD), shard_dir, 2)
    write_manifest(shard_dir, {"files": files, "config": {"mine": {"num_negatives": 2}}})
    return shard_dir


def flagembedding_group(line: dict, train_group_size: int) -> list[str]:
    """FlagEmbedding's own rule (AbsEmbedderTrainDataset.__getitem__, FlagEmbedding 1.4.2): one
    positive plus train_group_size - 1 negatives sampled from ``neg``, with replacement where
    ``neg`` is shorter; an empty ``neg`` divides by zero there."""
    assert isinstance(line["query"], str) and line["query"]
    assert isinstance(line["pos"], list) and line["pos"] and isinstance(line["neg"], list)
    assert all(isinstance(t, str) for t in line["pos"] + line["neg"])
    assert len(line["neg_scores"]) == len(line["neg"]) and len(line["pos_scores"]) == 1
    assert all(isinstance(s, (int, float)) for s in line["pos_scores"] + line["neg_scores"])
    idx, k = list(range(len(line["neg"]))), train_group_size - 1
    idx = random.sample(idx * math.ceil(k / len(idx)), k) if len(idx) < k else random.sample(idx, k)
    return [random.choice(line["pos"]), *(line["neg"][i] for i in idx)]


def test_shard_folder_loads_as_one_table_in_every_reader(shard_dir):
    import datasets
    import pandas as pd
    import polars as pl
    import pyarrow.parquet as pq

    want = [r["query_id"] for r in _rows_in_order(shard_dir)]
    assert pq.read_table(shard_dir).column("query_id").to_pylist() == want
    assert pd.read_parquet(shard_dir)["query_id"].tolist() == want
    assert pl.read_parquet(shard_dir)["query_id"].to_list() == want
    ds = datasets.load_dataset("parquet", data_dir=str(shard_dir), split="train")
    assert ds["query_id"] == want  # file and row order: batches stay contiguous
    assert ds["batch_id"] == sorted(ds["batch_id"])


def test_sentence_transformers_short_rows_drop_or_repeat(tmp_path):
    shard_dir = _small_run(tmp_path, [2, 1, 0, 3, 2, 1])
    counts = to_sentence_transformers(shard_dir, tmp_path / "drop")  # default: drop
    assert counts == {"format": "sentence-transformers", "num_negatives": 2, "short": "drop",
                      "rows_in": 6, "rows_written": 3, "rows_dropped": 3, "rows_filled": 0,
                      "rows_without_negatives": 1, "batches": 3}  # fmt: skip
    assert json.loads((tmp_path / "drop.json").read_text()) == counts
    table = pa.parquet.read_table(tmp_path / "drop" / "train.parquet")
    assert table.column_names == ["anchor", "positive", "negative_1", "negative_2"]
    assert table.column("anchor").to_pylist() == ["question 0", "question 3", "question 4"]
    assert ShardOrderSampler.from_export(tmp_path / "drop").batch_sizes == [1, 1, 1]

    counts = to_sentence_transformers(shard_dir, tmp_path / "rep", short="repeat")
    assert (counts["rows_written"], counts["rows_dropped"], counts["rows_filled"]) == (5, 1, 2)
    rows = pa.parquet.read_table(tmp_path / "rep" / "train.parquet").to_pylist()
    assert [r["anchor"] for r in rows] == [f"question {i}" for i in (0, 1, 3, 4, 5)]
    assert (rows[1]["negative_1"], rows[1]["negative_2"]) == ("other 1.0", "other 1.0")
    assert ShardOrderSampler.from_export(tmp_path / "rep").batch_sizes == [2, 1, 2]
    with pytest.raises(CurateError, match="short"):
        to_sentence_transformers(shard_dir, tmp_path / "x", short="pad")


def test_flagembedding_short_rows_drop_or_repeat(tmp_path):
    shard_dir = _small_run(tmp_path, [2, 1, 0, 3])
    counts = to_flagembedding(shard_dir, tmp_path / "drop.jsonl")
    lines = [json.loads(x) for x in (tmp_path / "drop.jsonl").read_text().splitlines()]
    assert [x["query"] for x in lines] == ["question 0", "question 3"]
    assert len(lines[1]["neg"]) == 3  # every negative a row has: FlagEmbedding samples from them
    assert (counts["rows_written"], counts["rows_dropped"], counts["rows_filled"]) == (2, 2, 0)
    assert json.loads((tmp_path / "drop.json").read_text()) == counts

    counts = to_flagembedding(shard_dir, tmp_path / "fe", short="repeat")  # a folder: train.jsonl
    lines = [json.loads(x) for x in (tmp_path / "fe" / "train.jsonl").read_text().splitlines()]
    assert sorted(p.name for p in (tmp_path / "fe").iterdir()) == ["train.jsonl"]
    assert [x["query"] for x in lines] == ["question 0", "question 1", "question 3"]
    assert lines[1]["neg"] == ["other 1.0", "other 1.0"] and lines[1]["neg_scores"] == [0.5, 0.5]
    assert (counts["rows_written"], counts["rows_dropped"], counts["rows_filled"]) == (3, 1, 1)
    assert json.loads((tmp_path / "fe.json").read_text()) == counts


def test_flagembedding_every_line_loads_in_its_sampler(shard_dir, tmp_path):
    rows = _rows_in_order(shard_dir)
    assert any(not r["negs"] for r in rows)  # the run has rows without negatives to handle
    for short in ("drop", "repeat"):
        counts = to_flagembedding(shard_dir, tmp_path / f"{short}.jsonl", short=short)
        text = (tmp_path / f"{short}.jsonl").read_text()
        lines = [json.loads(x) for x in text.splitlines()]
        assert counts["rows_written"] == len(lines) > 0
        assert counts["rows_written"] + counts["rows_dropped"] == counts["rows_in"] == len(rows)
        assert all(len(x["neg"]) >= NUM_NEGATIVES for x in lines)
        for line in lines:
            assert len(flagembedding_group(line, train_group_size=8)) == 8


def test_sentence_transformers_trains_with_mnrl_on_all_negatives(shard_dir, tmp_path):
    import datasets
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
        losses,
    )

    num_negatives = read_manifest(shard_dir)["config"]["mine"]["num_negatives"]
    counts = to_sentence_transformers(shard_dir, tmp_path / "st")  # the run's num_negatives
    path = str(tmp_path / "st" / "train.parquet")
    ds = datasets.load_dataset("parquet", data_files=path, split="train")
    negatives = [f"negative_{i + 1}" for i in range(num_negatives)]
    assert counts["num_negatives"] == num_negatives == NUM_NEGATIVES
    assert ds.column_names == ["anchor", "positive", *negatives]
    assert ds.num_rows == counts["rows_written"] > 0 and counts["rows_dropped"] > 0
    sampler = ShardOrderSampler.from_export(tmp_path / "st")
    batches = list(sampler(ds))
    assert [len(b) for b in batches] == sampler.batch_sizes
    assert [i for b in batches for i in b] == list(range(ds.num_rows))

    from curate.embed.encoder import resolve_model

    model = SentenceTransformer(str(resolve_model("all-MiniLM-L6-v2")), device="cpu")
    model.max_seq_length = 32
    before = [p.detach().clone() for p in model.parameters()]
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "st-out"), max_steps=1, per_device_train_batch_size=8,
        learning_rate=1e-3, batch_sampler=sampler, report_to=[], save_strategy="no",
        use_cpu=True, logging_steps=1, dataloader_drop_last=False,
    )  # fmt: skip
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=ds, loss=losses.MultipleNegativesRankingLoss(model)
    )
    trainer.train()
    assert trainer.state.global_step == 1
    assert math.isfinite(trainer.state.log_history[0]["loss"])
    assert any(not (a == b).all() for a, b in zip(before, model.parameters()))


def test_cli_export_prints_and_writes_counts(run_dir, tmp_path, capsys):
    dest = tmp_path / "fe.jsonl"
    assert cli.main(["export", str(run_dir), "--format", "flagembedding", "--to", str(dest),
                     "--short", "repeat", "-q"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    counts = json.loads((tmp_path / "fe.json").read_text())
    assert f"{counts['rows_written']} written" in out and f"{counts['rows_filled']} filled" in out
    assert f"{counts['rows_dropped']} dropped" in out and "repeat" in out
    with pytest.raises(SystemExit):
        cli.main(["export", "--help"])
    help_text = capsys.readouterr().out
    assert "--short" in help_text and "drop" in help_text and "repeat" in help_text


def test_cli_export_of_an_old_run_says_rerun(tmp_path, capsys):
    shard_dir = _small_run(tmp_path, [2, 2])
    (tmp_path / MANIFEST).rename(shard_dir / MANIFEST)  # an older curate's layout
    assert cli.main(["export", str(tmp_path), "-q"]) == 2
    assert "rerun `curate batch`" in capsys.readouterr().err
