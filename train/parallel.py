"""Where the trainer runs: its device (``train.device``) and its data-parallel ranks.

Device: ``auto`` is CUDA when torch sees it, else CPU. On CUDA the encoder runs under bf16
autocast (fp16 with a grad scaler on GPUs without bf16); the loss is computed in fp32.

Data parallel (torchrun, or ``train.processes`` > 1): the batch stays the unit. Every rank reads
the whole row group (the global batch, B rows) and builds the global columns and masks from it,
so known positives, forbidden pairs and repeated columns are masked across ranks. Rank r embeds
only its contiguous slice of rows (their queries, positives and negatives). The embeddings are
all-gathered and the rank's own slice of the gathered tensor is replaced by its local tensor,
which carries the gradient (OpenCLIP's gather without grad, with the global loss on every rank).
Every rank computes the same global loss L over all B rows and C columns; its backward gives
dL/de for its own embeddings only, so its parameter gradient is the part of dL/dtheta that flows
through its rows, and the sum over ranks (one all-reduce) is the one-process gradient exactly.

The gradient is all-reduced once after the step's backward instead of by DDP's module hooks:
GradCache runs the encoder several times a step (a no-graph pass, then one replay per chunk, for
queries and documents apart), and DDP would all-reduce at each replay unless all but the last ran
under no_sync. One flattened all-reduce is exact and simple; it does not overlap with backward.
"""

from __future__ import annotations

import logging
import os
import socket
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from curate.errors import ConfigError

if TYPE_CHECKING:  # polars only for the annotation: benchmarks/gpu_check.py runs without it
    import polars as pl

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


SINGLE = World()  # one process, no process group


def world_from_env() -> World:
    """The rank torchrun (or ``spawn``) gave this process; one process when none is set."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return World(rank, size, int(os.environ.get("LOCAL_RANK", str(rank))))


def resolve_device(pref: str, world: World) -> torch.device:
    """``train.device`` -> the torch device of this rank (on CUDA: GPU local_rank)."""
    if pref not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"train.device: {pref!r}; choose auto, cpu or cuda")
    cuda = torch.cuda.is_available()
    if pref == "cuda" and not cuda:
        raise ConfigError(
            f"train.device: 'cuda' but torch {torch.__version__} sees no CUDA device "
            f"(built with CUDA {torch.version.cuda}); set train.device=cpu or auto"
        )
    if pref == "cpu" or not cuda:
        return torch.device("cpu")
    if world.local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"train: process {world.local_rank} of this machine needs GPU {world.local_rank}, "
            f"but torch sees {torch.cuda.device_count()}; lower train.processes / --nproc-per-node"
        )
    torch.cuda.set_device(world.local_rank)
    return torch.device("cuda", world.local_rank)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA where supported, fp16 on older GPUs, None (fp32) on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def grad_scaler(dtype: torch.dtype | None):
    """fp16 gradients underflow without loss scaling; bf16 and fp32 need none."""
    return torch.amp.GradScaler("cuda") if dtype == torch.float16 else None


def init(world: World, device: torch.device, timeout: timedelta | None = None) -> None:
    """Join the process group (NCCL between GPUs, gloo on CPU) unless already in one;
    ``timeout`` bounds the wait for the other ranks (torch's default: 30 min)."""
    if world.size == 1 or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=world.rank, world_size=world.size, timeout=timeout)
    log.info("rank %d of %d joined the %s process group", world.rank, world.size, backend)


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def row_slices(n_rows: int, size: int, batch: int | None = None) -> list[tuple[int, int]]:
    """Contiguous (start, stop) row ranges of near-equal size, one per rank."""
    if n_rows < size:
        raise ValueError(
            f"batch {batch} has {n_rows} rows for {size} processes: every process needs a row; "
            "compose larger batches (batch.batch_size) or run fewer processes"
        )
    edges = [n_rows * r // size for r in range(size + 1)]
    return list(zip(edges[:-1], edges[1:]))


def local_texts(rows: pl.DataFrame, world: World, batch: int | None = None):
    """This rank's slice of the batch -> (query texts, doc texts = its positives then its rows'
    negatives, the column layout's order) and every rank's (rows, negatives) counts."""
    counts = [len(n) for n in rows["neg_ids"].to_list()]
    slices = row_slices(rows.height, world.size, batch)
    sizes = [(b - a, sum(counts[a:b])) for a, b in slices]
    a, b = slices[world.rank]
    mine = rows.slice(a, b - a)
    docs = mine["pos"].to_list() + [t for ts in mine["negs"] for t in ts]
    return mine["query"].to_list(), docs, sizes


def _all_gather(x: Tensor, sizes: list[int], world: World) -> list[Tensor]:
    """Every rank's ``x`` ([sizes[r], D] on rank r), padded to one shape for the collective."""
    width = max(sizes)
    pad = torch.zeros(width - len(x), *x.shape[1:], dtype=x.dtype, device=x.device)
    parts = [x.new_empty(width, *x.shape[1:]) for _ in sizes]
    dist.all_gather(parts, torch.cat([x.detach(), pad]).contiguous())
    return [p[:n] for p, n in zip(parts, sizes)]


def gather_columns(q: Tensor, d: Tensor, sizes: list[tuple[int, int]], world: World):
    """Local q [b, D], d [b + n, D] -> global q [B, D], d [C, D] in the batch's column order
    (all positives in row order, then all negatives), this rank's slices carrying its gradient."""
    if world.size == 1:
        return q, d
    rows = [r for r, _ in sizes]
    qs = _all_gather(q, rows, world)
    ds = _all_gather(d, [r + n for r, n in sizes], world)
    qs[world.rank], ds[world.rank] = q, d  # the local slice keeps its graph
    pos = [x[:r] for x, r in zip(ds, rows)]
    neg = [x[r:] for x, r in zip(ds, rows)]
    return torch.cat(qs), torch.cat(pos + neg)


def all_reduce_grads(params: list[Tensor], world: World, average: bool = False) -> None:
    """Sum (or average) ``.grad`` over ranks in one flattened collective. Params without a
    grad are the same on every rank (same code, same model), so the layout agrees."""
    if world.size == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    if average:
        flat /= world.size
    start = 0
    for g in grads:
        g.copy_(flat[start : start + g.numel()].view_as(g))
        start += g.numel()


def broadcast_params(module: torch.nn.Module, world: World) -> None:
    """Rank 0's weights everywhere: the ranks start (and so stay) identical."""
    if world.size == 1:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


def gather_objects(obj, world: World) -> list:
    if world.size == 1:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, size: int, port: int, fn, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    # A spawned process starts with no logging set up: rank 0 reports as the caller would.
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: "
                               "%(message)s", datefmt="%H:%M:%S")
    try:
        fn(*args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn, nprocs: int, args: tuple = ()) -> None:
    """Run ``fn(*args)`` in ``nprocs`` fresh processes on this machine, ranks 0..nprocs-1 on
    127.0.0.1 (what torchrun --nproc-per-node does, without its launcher). ``fn`` must be
    importable (spawned processes re-import it); a failed rank fails the call."""
    import torch.multiprocessing as mp

    port = free_port()
    log.info("starting %d training processes (rendezvous 127.0.0.1:%d)", nprocs, port)
    mp.spawn(_entry, args=(nprocs, port, fn, args), nprocs=nprocs, join=True)
