"""The trainer on hand-written shards with a tiny BERT: masks from known positives and forbidden
pairs, exact resume after an injected crash, loss variants and distillation run end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file

import train.train as trainer
from curate import schema
from curate.batch import shards
from curate.batch.shards import write_shards
from curate.config import EmbedConfig, TrainConfig
from curate.errors import ConfigError
from curate.files import write_json


def _shards(root: Path, n_batches: int = 4, rows: int = 3) -> Path:
    recs = []
    for b in range(n_batches):
        for r in range(rows):
            i = b * rows + r
            recs.append({
                "batch_id": b, "query_id": f"q{i}", "query": f"question number {i} about wings",
                "pos_id": f"p{i}", "pos": f"answer {i} on wing lift", "pos_score": 0.8,
                "neg_ids": [f"n{i}a", f"n{i}b"], "negs": [f"other text {i}", f"unrelated {i}"],
                "neg_scores": [0.5, 0.4], "neg_ranks": [1, 2], "topic": b % 2,
                "known_pos_ids": [f"p{i}"],
            })  # fmt: skip
    table = pa.Table.from_pylist(recs, schema=schema.SHARD)
    shard_dir = root / "shards"
    files = write_shards(table, shard_dir, batches_per_shard=2)
    # q0 had n1a rejected as a likely false negative while mining: masked where it shows up.
    forbidden = pa.table({"query_id": ["q0"], "doc_id": ["n1a"], "reason": ["above_ceiling"],
                          "score": pa.array([0.9], pa.float32())})  # fmt: skip
    pa.parquet.write_table(forbidden, root / "forbidden.parquet")
    manifest = {"files": files, "forbidden": {"path": "../forbidden.parquet"}}
    # Wherever this curate keeps a shard folder's manifest (beside the folder since the move).
    where = getattr(shards, "manifest_path", lambda d: d / shards.MANIFEST)
    write_json(where(shard_dir), manifest)
    return shard_dir


def test_batch_masks_obey_known_positives_and_forbidden(tmp_path):
    shard_dir = _shards(tmp_path)
    _, rows = next(iter(trainer.iter_batches(shard_dir)))
    import polars as pl

    rows = pl.from_arrow(rows)
    _, _, col_ids, known, rejected = trainer.batch_columns(rows, trainer.load_forbidden(shard_dir))
    assert col_ids[:3] == ["p0", "p1", "p2"] and col_ids[3:5] == ["n0a", "n0b"]
    mask, positives = trainer.batch_masks(TrainConfig(), col_ids, known, rejected)
    assert positives is None
    expected = torch.zeros(3, 9, dtype=torch.bool)
    expected[0, col_ids.index("n1a")] = True  # the planted false negative, only for q0
    assert torch.equal(mask, expected)


def _weights(path: Path) -> dict:
    return load_file(path / "model.safetensors")


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(
        max_steps=4, checkpoint_every=2, max_length=16, lr=1e-3, warmup_steps=1, **kw
    )


def test_resume_after_crash_equals_uninterrupted(tmp_path, tiny_model, monkeypatch):
    shard_dir = _shards(tmp_path)
    straight = trainer.train(shard_dir, tmp_path / "a", tiny_model, _cfg(), EmbedConfig(), seed=1)

    real = trainer.make_loss
    calls = {"n": 0}

    def crashing(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # after the step-2 checkpoint, in the middle of step 3
            raise RuntimeError("injected crash")
        return real(*args, **kw)

    monkeypatch.setattr(trainer, "make_loss", crashing)
    with pytest.raises(RuntimeError, match="injected"):
        trainer.train(shard_dir, tmp_path / "b", tiny_model, _cfg(), EmbedConfig(), seed=1)
    monkeypatch.setattr(trainer, "make_loss", real)
    resumed = trainer.train(shard_dir, tmp_path / "b", tiny_model, _cfg(), EmbedConfig(), seed=1)

    a, b = _weights(straight), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    log_a = [
        json.loads(x)["loss"] for x in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()
    ]
    log_b = [json.loads(x) for x in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log_b] == log_a  # steps 1, 2, then 3, 4 after the resume
    assert [r["step"] for r in log_b] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "kw",
    [
        {"loss": "decoupled"},
        {"loss": "multi_positive", "symmetric": True},
        {"learn_temperature": True, "distill": "kl"},
        {"distill": "mse", "chunk_size": 2},
    ],
)
def test_variants_train_and_change_weights(tmp_path, tiny_model, kw):
    shard_dir = _shards(tmp_path)
    out = trainer.train(shard_dir, tmp_path / "m", tiny_model, _cfg(**kw), EmbedConfig(), seed=0)
    before = load_file(tiny_model / "model.safetensors")
    after = _weights(out)
    assert any(not torch.equal(before[k], after[k]) for k in after if k in before)
    log = [json.loads(x) for x in (tmp_path / "m" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 4 and all(r["loss"] == r["loss"] for r in log)  # no NaN
    # batches without masked entries: 9 candidate columns each, bound = log 9 - loss
    unmasked = [r for r in log if r["masked_fraction"] == 0]
    assert len(unmasked) == 3
    assert all(abs(r["mi_bound"] - (math.log(9) - r["loss"])) < 1e-3 for r in unmasked)


def test_device_cpu_trains_and_cuda_without_cuda_is_a_config_error(tmp_path, tiny_model):
    shard_dir = _shards(tmp_path)
    out = trainer.train(shard_dir, tmp_path / "cpu", tiny_model, _cfg(device="cpu"), EmbedConfig())
    assert (out / "model.safetensors").is_file()
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the error path cannot be reached")
    with pytest.raises(ConfigError, match="train.device: 'cuda'.*train.device=cpu"):
        trainer.train(shard_dir, tmp_path / "gpu", tiny_model, _cfg(device="cuda"), EmbedConfig())
    assert not (tmp_path / "gpu").exists()  # failed before anything was written


def test_checkpoint_round_trips_onto_the_parameters_device(tmp_path, tiny_model):
    from transformers import AutoModel

    def fresh(seed: int):
        torch.manual_seed(seed)
        model = AutoModel.from_pretrained(str(tiny_model))
        temp = trainer.LearnableTemperature(0.07)
        opt = trainer.make_optimizer(_cfg(learn_temperature=True), list(model.parameters()), temp)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, trainer.lr_lambda(1, 10))
        return model, opt, sched, temp

    model, opt, sched, temp = fresh(0)
    for p in model.parameters():  # one real step, so AdamW has moments to save
        p.grad = torch.randn_like(p)
    temp.log_t.grad = torch.tensor(0.5)
    opt.step()
    sched.step()
    torch.manual_seed(42)
    trainer.save_checkpoint(tmp_path, 1, model, opt, sched, temp)
    expected_draw = torch.rand(3)

    model2, opt2, sched2, temp2 = fresh(1)
    torch.manual_seed(7)
    assert (
        trainer.load_checkpoint(trainer.latest_checkpoint(tmp_path), model2, opt2, sched2, temp2)
        == 1
    )
    assert torch.equal(torch.rand(3), expected_draw)  # the RNG resumes where it was saved
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values())
    )
    assert float(temp2().detach()) == float(temp().detach())
    assert sched2.state_dict() == sched.state_dict()
    device = next(model2.parameters()).device
    moments = [t for s in opt2.state.values() for t in s.values() if t.dim() > 0]
    assert moments and all(t.device == device for t in moments)
    for s1, s2 in zip(opt.state.values(), opt2.state.values()):
        assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_nproc_is_train_processes():
    from pipelines import cli

    args = cli.build_parser().parse_args(["train", "--nproc", "2", "--set", "train.device=cpu"])
    assert cli._config(args).train.processes == 2


def test_grad_scaler_path_gives_the_unscaled_loss_and_gradients(tmp_path, tiny_model):
    # The fp16 path (GPUs without bf16) scales the loss inside GradCache; checked here on the CPU
    # with a CPU scaler: after unscale_ the gradients are those of the plain step.
    import polars as pl
    from transformers import AutoModel, AutoTokenizer

    shard_dir = _shards(tmp_path)
    rows = pl.from_arrow(next(iter(trainer.iter_batches(shard_dir)))[1])
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    cfg = TrainConfig(max_length=16, chunk_size=2)
    out = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=1024.0)):
        model = AutoModel.from_pretrained(str(tiny_model)).eval()
        opt = trainer.make_optimizer(cfg, list(model.parameters()), 0.05)
        step = trainer.Stepper(
            cfg,
            trainer.encoder(model),
            tok,
            0.05,
            trainer.parallel.SINGLE,
            torch.device("cpu"),
            trainer.load_forbidden(shard_dir),
            scaler,
        )
        loss, _, _ = step.backward(rows, 0)
        if scaler is not None:
            scaler.unscale_(opt)
        out.append((loss, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (loss_a, grads_a), (loss_b, grads_b) = out
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    assert len(grads_a) == len(grads_b) > 10
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_a, grads_b))
