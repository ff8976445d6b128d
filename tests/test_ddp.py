"""Data-parallel training on CPU (gloo, 2 processes on 127.0.0.1): one global batch split over two
ranks gives the loss and gradients of one process over the whole batch, masks included (a known
positive, a forbidden pair and a repeated column that cross ranks), with and without GradCache;
a 2-process run killed mid-way and resumed ends with the weights of an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

import train.train as trainer
from curate import schema
from curate.batch import shards
from curate.config import EmbedConfig, TrainConfig
from curate.files import write_json
from train import parallel

ATOL = 1e-5
VARIANTS = [
    {},
    {"chunk_size": 2, "loss": "multi_positive", "symmetric": True, "learn_temperature": True},
    {"chunk_size": 1, "distill": "kl"},
]


def _shards(root: Path, n_batches: int = 1, rows: int = 4) -> Path:
    """Batches of 4 rows: ranks 0 and 1 of 2 take rows 0-1 and 2-3. Planted in every batch: row 0
    knows row 3's positive, row 1 had row 2's first negative rejected, row 3 repeats row 0's."""
    recs = []
    for b in range(n_batches):
        ids = [b * rows + r for r in range(rows)]
        for r, i in enumerate(ids):
            negs = [f"n{i}a", f"n{i}b"] if r != 3 else [f"n{ids[0]}a", f"n{i}b"]
            recs.append({
                "batch_id": b, "query_id": f"q{i}", "query": f"question number {i} about wings",
                "pos_id": f"p{i}", "pos": f"answer {i} on wing lift", "pos_score": 0.8,
                "neg_ids": negs, "negs": [f"text of {n}" for n in negs],
                "neg_scores": [0.5, 0.4], "neg_ranks": [1, 2], "topic": 0,
                "known_pos_ids": [f"p{i}"] + ([f"p{ids[3]}"] if r == 0 else []),
            })  # fmt: skip
    shard_dir = root / "shards"
    files = shards.write_shards(pa.Table.from_pylist(recs, schema=schema.SHARD), shard_dir, 2)
    qs = [f"q{b * rows + 1}" for b in range(n_batches)]
    forbidden = pa.table({
        "query_id": qs, "doc_id": [f"n{b * rows + 2}a" for b in range(n_batches)],
        "reason": ["above_ceiling"] * n_batches, "score": pa.array([0.9] * n_batches, pa.float32()),
    })  # fmt: skip
    pq.write_table(forbidden, root / "forbidden.parquet")
    manifest = {"files": files, "forbidden": {"path": "../forbidden.parquet"}}
    where = getattr(shards, "manifest_path", lambda d: d / shards.MANIFEST)
    write_json(where(shard_dir), manifest)
    return shard_dir


def batch_gradients(model_path: Path, shard_dir: Path) -> list[dict]:
    """Loss, mask and summed gradients of the first batch for each variant on this process's
    rank (one process when no rank is set)."""
    from transformers import AutoModel, AutoTokenizer

    world = parallel.world_from_env()
    rows = pl.from_arrow(next(iter(shards.iter_batches(shard_dir)))[1])
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    result = []
    for kw in VARIANTS:
        cfg = TrainConfig(max_length=16, **kw)
        model = AutoModel.from_pretrained(str(model_path)).eval()  # no dropout: ranks agree
        temp = trainer.LearnableTemperature(0.05) if cfg.learn_temperature else 0.05
        step = trainer.Stepper(cfg, trainer.encoder(model), tokenizer, temp, world,
                               torch.device("cpu"), trainer.load_forbidden(shard_dir))  # fmt: skip
        loss, mask, _ = step.backward(rows, 0)
        parallel.all_reduce_grads(list(model.parameters()), world)
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        if cfg.learn_temperature:
            parallel.all_reduce_grads([temp.log_t], world, average=True)
            grads["log_t"] = temp.log_t.grad
        result.append({"loss": loss, "mask": mask, "grads": grads})
    return result


RUN = TrainConfig(max_steps=4, checkpoint_every=2, max_length=16, lr=1e-3, warmup_steps=1,
                  chunk_size=1, processes=2)  # fmt: skip


def two_ranks(model_path: Path, root: Path) -> None:
    """Everything the tests need from 2 ranks, in one start of the processes (each start
    re-imports torch and transformers): the first batch's gradients; a run of 4 steps; a run that
    crashes at step 3 (an exception on both ranks, past the step-2 checkpoint), then its resume."""
    world = parallel.world_from_env()
    parallel.init(world, torch.device("cpu"))
    grads = batch_gradients(model_path, root / "one-batch" / "shards")
    torch.save(grads, root / f"grads-{world.rank}.pt")
    # dropout on (tiny BERT: 0.1): the resume must restore each rank's RNG stream
    trainer.train(root / "shards", root / "a", model_path, RUN, EmbedConfig(), seed=3)
    real, calls = trainer.make_loss, [0]

    def crashing(*args, **kw):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("injected crash")
        return real(*args, **kw)

    trainer.make_loss = crashing
    try:
        trainer.train(root / "shards", root / "b", model_path, RUN, EmbedConfig(), seed=3)
    except RuntimeError as err:
        assert "injected" in str(err)
    finally:
        trainer.make_loss = real
    (root / f"crashed-{world.rank}").write_text(json.dumps(calls[0]))
    if world.main:
        (root / "b-log-at-crash").write_text((root / "b" / "train_log.jsonl").read_text())
    trainer.train(root / "shards", root / "b", model_path, RUN, EmbedConfig(), seed=3)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, tiny_model) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    _shards(root / "one-batch")
    _shards(root, n_batches=4)
    parallel.spawn(two_ranks, 2, (tiny_model, root))
    return root


def test_two_ranks_give_the_loss_and_gradients_of_one_process(ranks, tiny_model):
    one = batch_gradients(tiny_model, ranks / "one-batch" / "shards")
    two = [torch.load(ranks / f"grads-{r}.pt") for r in (0, 1)]
    cols = ["p0", "p1", "p2", "p3", "n0a", "n0b", "n1a", "n1b", "n2a", "n2b", "n0a", "n3b"]
    mask = one[0]["mask"]
    assert mask[0, cols.index("p3")] and mask[1, cols.index("n2a")]  # planted across ranks
    assert mask[:, 10].all()  # row 3's copy of n0a, on rank 1, masked for every row
    for v, ref in enumerate(one):
        for got in two:
            assert torch.equal(got[v]["mask"], ref["mask"])
            assert torch.allclose(got[v]["loss"], ref["loss"], atol=ATOL), VARIANTS[v]
            assert got[v]["grads"].keys() == ref["grads"].keys() and len(ref["grads"]) > 10
            for name, g in ref["grads"].items():
                assert torch.allclose(got[v]["grads"][name], g, atol=ATOL), (VARIANTS[v], name)


def _weights(out: Path) -> dict:
    return load_file(out / "final" / "model.safetensors")


def _log(text: str) -> list[dict]:
    return [json.loads(x) for x in text.splitlines()]


def test_resumed_two_process_run_equals_an_uninterrupted_one(ranks):
    assert [json.loads((ranks / f"crashed-{r}").read_text()) for r in (0, 1)] == [3, 3]
    assert [r["step"] for r in _log((ranks / "b-log-at-crash").read_text())] == [1, 2]
    a, b = _weights(ranks / "a"), _weights(ranks / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    log_a = _log((ranks / "a" / "train_log.jsonl").read_text())
    log_b = _log((ranks / "b" / "train_log.jsonl").read_text())
    assert [r["loss"] for r in log_b] == [r["loss"] for r in log_a]
    assert [r["step"] for r in log_b] == [1, 2, 3, 4]
    assert {r["rows"] for r in log_a} == {4}  # the global batch, logged once


def test_row_slices_cover_the_batch_and_refuse_a_rank_without_rows():
    assert parallel.row_slices(5, 2) == [(0, 2), (2, 5)]
    assert parallel.row_slices(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(ValueError, match="batch 7 has 1 rows for 2 processes"):
        parallel.row_slices(1, 2, batch=7)
