"""GradCache: a contrastive loss over a batch larger than fits in memory with a graph.

Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"
(arXiv:2101.06983). With embeddings e = f_theta(x) and a loss L(e) that couples the whole batch,

    dL/dtheta = sum_k (dL/de_k)^T de_k/dtheta

so the loss's coupling and the encoder's graph can be split:
1. embed every chunk without a graph -> q_all [B, D], d_all [C, D];
2. make them leaves, compute L on the full batch and backprop to get g = dL/de (this also fills
   the grad of any parameter used inside loss_fn, e.g. a learnable temperature);
3. re-embed chunk by chunk with a graph and backprop e_k with the cached g_k, accumulating into
   the encoder's .grad. Peak activation memory is that of one chunk.

Step 3 must reproduce step 1 exactly, dropout included, so the RNG state is recorded before each
chunk in step 1 and restored for that chunk in step 3 (inside fork_rng, so the caller's RNG stream
ends where a single pass would leave it). On CUDA that is the generator of the current device,
the one the encoder runs on (each data-parallel rank sets its own), once CUDA is in use: touching
every visible GPU would open a context on each of them from every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

Inputs = dict[str, Tensor]
Encode = Callable[[Inputs], Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class _RngState:
    cpu: Tensor
    cuda: Tensor | None  # the current device's generator
    device: int | None


def _capture_rng() -> _RngState:
    if not torch.cuda.is_initialized():
        return _RngState(torch.get_rng_state(), None, None)
    device = torch.cuda.current_device()
    return _RngState(torch.get_rng_state(), torch.cuda.get_rng_state(device), device)


@contextmanager
def _restored_rng(state: _RngState) -> Iterator[None]:
    devices = [state.device] if state.device is not None else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state.cpu)
        if state.cuda is not None:
            torch.cuda.set_rng_state(state.cuda, state.device)
        yield


def _chunks(inputs: Inputs, chunk_size: int) -> list[Inputs]:
    n = len(next(iter(inputs.values())))
    return [{k: v[s : s + chunk_size] for k, v in inputs.items()} for s in range(0, n, chunk_size)]


def _embed_no_grad(encode: Encode, chunks: list[Inputs]) -> tuple[Tensor, list[_RngState]]:
    embs, states = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(_capture_rng())
            embs.append(encode(chunk))  # [n_k, D]
    return torch.cat(embs), states  # [N, D]


def _replay(encode: Encode, chunks: list[Inputs], states: list[_RngState], grad: Tensor) -> None:
    start = 0
    for chunk, state in zip(chunks, states, strict=True):
        with _restored_rng(state):
            emb = encode(chunk)  # [n_k, D], with graph
        torch.autograd.backward(emb, grad[start : start + len(emb)])
        start += len(emb)


def gradcache_backward(
    encode_q: Encode,
    encode_d: Encode,
    q_inputs: Inputs,
    d_inputs: Inputs,
    loss_fn: LossFn,
    chunk_size: int,
) -> Tensor:
    """Accumulate the gradients of loss_fn(encode_q(q_inputs), encode_d(d_inputs)) chunk by chunk.

    Same result as ``plain_backward`` up to float error; returns the detached loss. chunk_size == 0
    falls back to ``plain_backward``. Data-parallel ranks all-reduce the gradient after it
    (``train/parallel.py``); a DDP-wrapped encoder would need all but the last replay in no_sync().
    """
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 0 (0 = no chunking), got {chunk_size}")
    if chunk_size == 0:
        return plain_backward(encode_q, encode_d, q_inputs, d_inputs, loss_fn, chunk_size)
    q_chunks, d_chunks = _chunks(q_inputs, chunk_size), _chunks(d_inputs, chunk_size)
    q_all, q_states = _embed_no_grad(encode_q, q_chunks)  # [B, D]
    d_all, d_states = _embed_no_grad(encode_d, d_chunks)  # [C, D]
    q_all.requires_grad_(True)
    d_all.requires_grad_(True)
    loss = loss_fn(q_all, d_all)
    loss.backward()
    # A loss that ignores one side leaves its grad None; replaying it would add nothing.
    if q_all.grad is not None:
        _replay(encode_q, q_chunks, q_states, q_all.grad)
    if d_all.grad is not None:
        _replay(encode_d, d_chunks, d_states, d_all.grad)
    return loss.detach()


def plain_backward(
    encode_q: Encode,
    encode_d: Encode,
    q_inputs: Inputs,
    d_inputs: Inputs,
    loss_fn: LossFn,
    chunk_size: int = 0,
) -> Tensor:
    """One pass with the full graph (chunk_size is ignored); the reference for GradCache."""
    loss = loss_fn(encode_q(q_inputs), encode_d(d_inputs))
    loss.backward()
    return loss.detach()
