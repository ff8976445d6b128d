"""GradCache gives the loss and gradients of one full pass, with dropout on and off."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel

import train.gradcache as gradcache
from train.gradcache import gradcache_backward, plain_backward
from train.loss import LearnableTemperature, info_nce

ATOL = 1e-5


def _model() -> BertModel:
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    return BertModel(cfg)


def _inputs(n: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (n, length), generator=g)  # [n, L]
    lengths = torch.randint(2, length + 1, (n,), generator=g)  # [n]
    attn = (torch.arange(length)[None, :] < lengths[:, None]).long()  # [n, L]
    return {"input_ids": ids * attn, "attention_mask": attn}


def _encoder(model: BertModel, chunk_size: int = 0):
    """Mean pooling + L2 norm; chunk_size > 0 encodes in slices, still one graph."""

    def encode_one(batch):
        hidden = model(**batch).last_hidden_state  # [n, L, H]
        m = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [n, L, 1]
        return F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)  # [n, H]

    def encode(batch):
        if not chunk_size:
            return encode_one(batch)
        n = len(batch["input_ids"])
        parts = [
            {k: v[s : s + chunk_size] for k, v in batch.items()} for s in range(0, n, chunk_size)
        ]
        return torch.cat([encode_one(p) for p in parts])

    return encode


def _run(backward, train_mode: bool, chunked_reference: bool = False, learn_temp: bool = False):
    model = _model().train(train_mode)
    temp = LearnableTemperature(0.05) if learn_temp else None
    q, d = _inputs(6, 8, seed=1), _inputs(10, 12, seed=2)

    def loss_fn(qe, de):  # qe [6, H], de [10, H]
        return info_nce(qe, de, temperature=temp() if temp is not None else 0.05)

    # In train mode the reference encodes in the same slices as GradCache so that both draw the
    # same dropout masks; a single [N, L, H] draw would use the RNG stream differently.
    encode = _encoder(model, chunk_size=2 if chunked_reference else 0)
    torch.manual_seed(123)
    loss = backward(encode, encode, q, d, loss_fn, 2)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    if temp is not None:
        grads["log_t"] = temp.log_t.grad.clone()
    return loss, grads


def _assert_same(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert torch.allclose(loss_a, loss_b, atol=ATOL)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=ATOL), name


@pytest.mark.parametrize("learn_temp", [False, True])
def test_gradcache_matches_plain_in_eval_mode(learn_temp):
    _assert_same(
        _run(gradcache_backward, False, learn_temp=learn_temp),
        _run(plain_backward, False, learn_temp=learn_temp),
    )


@pytest.mark.parametrize("learn_temp", [False, True])
def test_gradcache_matches_plain_with_dropout(learn_temp):
    cached = _run(gradcache_backward, True, learn_temp=learn_temp)
    plain = _run(plain_backward, True, chunked_reference=True, learn_temp=learn_temp)
    _assert_same(cached, plain)
    assert "log_t" not in cached[1] or float(cached[1]["log_t"]) != 0.0


def test_dropout_check_fails_without_rng_restore(monkeypatch):
    # Guards the test above: without the restore, replayed dropout masks differ.
    monkeypatch.setattr(gradcache, "_restored_rng", lambda state: contextlib.nullcontext())
    cached = _run(gradcache_backward, True)
    plain = _run(plain_backward, True, chunked_reference=True)
    assert torch.allclose(cached[0], plain[0], atol=ATOL)  # the loss comes from the first pass
    assert any(not torch.allclose(cached[1][n], plain[1][n], atol=ATOL) for n in plain[1])


def test_chunk_size_zero_is_plain_and_negative_is_rejected():
    _assert_same(_run(lambda *a: gradcache_backward(*a[:5], 0), False), _run(plain_backward, False))
    with pytest.raises(ValueError, match="chunk_size"):
        gradcache_backward(None, None, {}, {}, None, -1)
