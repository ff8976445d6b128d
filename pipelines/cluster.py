"""The Dask cluster a run uses: an existing scheduler when given its address, else a
LocalCluster."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

from curate.config import ClusterConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Workers:
    client: object  # distributed.Client
    n_workers: int
    torch_threads: int  # per task, so workers x threads never oversubscribe the cores


def local_shape(cfg: ClusterConfig, cores: int | None = None) -> tuple[int, int]:
    """(workers, threads per worker) from the core count: one single-threaded process per pair
    of cores, so each task's torch/faiss gets the cores of its process without contention."""
    cores = cores or os.cpu_count() or 1
    if cfg.n_workers:
        workers = cfg.n_workers
    else:
        workers = max(1, min(cores // 2, 8)) if cores > 2 else cores
    threads = cfg.threads_per_worker or 1
    return workers, threads


def cuda_devices() -> int:
    """GPUs torch sees, 0 when dask-cuda is not installed (then GPUs are not given workers)."""
    if importlib.util.find_spec("dask_cuda") is None:
        return 0
    import torch

    return torch.cuda.device_count()


def in_process(cfg: ClusterConfig, texts: int | None) -> bool:
    """One worker in this process instead of worker processes (``cluster.workers``)."""
    if cfg.workers != "auto":
        return cfg.workers == "in_process"
    return not cfg.n_workers and texts is not None and texts <= cfg.in_process_max


def _local_cluster(cfg: ClusterConfig, texts: int | None):
    """-> (cluster, workers, threads per worker). One worker per GPU (dask-cuda pins each to its
    own device) when there are GPUs and dask-cuda; one worker in this process for a small run;
    else CPU workers x threads from the cores."""
    from distributed import LocalCluster

    if in_process(cfg, texts):
        # One task at a time, each with all the cores for torch/faiss: a single model in memory
        # and no process start-up. Tasks are the same functions, so the output is the same.
        cluster = LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=False,
            dashboard_address=":0",
            silence_logs=logging.ERROR,
        )
        log.info(
            "LocalCluster: 1 in-process worker (cluster.workers: %s, %s texts)", cfg.workers, texts
        )
        return cluster, 1, 1
    gpus = cuda_devices() if not cfg.n_workers else 0  # an explicit n_workers means CPU workers
    if gpus:
        from dask_cuda import LocalCUDACluster

        log.info("LocalCUDACluster: one worker per GPU (%d)", gpus)
        cluster = LocalCUDACluster(
            threads_per_worker=1, dashboard_address=":0", silence_logs=logging.ERROR
        )
        return cluster, gpus, 1
    workers, threads = local_shape(cfg)
    # ":0": a free port, so parallel runs never fight over 8787.
    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=threads,
        processes=True,
        dashboard_address=":0",
        silence_logs=logging.ERROR,
    )
    log.info("LocalCluster: %d worker(s) x %d thread(s)", workers, threads)
    return cluster, workers, threads


def arrow_system_allocator() -> None:
    """Arrow's default mimalloc pool keeps the pages it freed: 56 of the 334 MB peak of a warm
    Cranfield mining run (benchmarks/mine.py), at no measured speed cost with the system pool.
    Set for this process and, through the environment, for worker processes started after it
    (``pipelines.run.run`` calls it first); a user's own ARROW_DEFAULT_MEMORY_POOL wins."""
    if "ARROW_DEFAULT_MEMORY_POOL" in os.environ:
        return
    import pyarrow as pa

    os.environ["ARROW_DEFAULT_MEMORY_POOL"] = "system"
    pa.set_memory_pool(pa.system_memory_pool())


@contextlib.contextmanager
def connect(cfg: ClusterConfig, quiet: bool = False, texts: int | None = None) -> Iterator[Workers]:
    """``texts``: how many texts the run embeds (corpus + queries), for ``cluster.workers: auto``;
    None (unknown) starts worker processes."""
    from distributed import Client

    # distributed sets its loggers to INFO on import; its lines would drown the run's own.
    logging.getLogger("distributed").setLevel(logging.WARNING)

    if cfg.scheduler:
        client = Client(cfg.scheduler)
        n = len(client.scheduler_info()["workers"])
        log.info("joined Dask scheduler %s with %d workers", cfg.scheduler, n)
        try:
            yield Workers(client, n, max(1, (os.cpu_count() or 1) // max(n, 1)))
        finally:
            client.close()
        return
    cluster, workers, threads = _local_cluster(cfg, texts)
    client = Client(cluster)
    if not quiet:
        if importlib.util.find_spec("bokeh"):
            log.info("Dask dashboard: %s", client.dashboard_link)
        else:
            log.info("Dask dashboard off (pip install bokeh to get it)")
    torch_threads = max(1, (os.cpu_count() or 1) // (workers * threads))
    try:
        yield Workers(client, workers, torch_threads)
    finally:
        client.close()
        cluster.close()
        if in_process(cfg, texts):  # its tasks cached the model in this process: free it
            from curate.embed.encoder import drop_encoders

            drop_encoders()


def gather(workers: Workers, futures: list, desc: str) -> list:
    """The futures' results, with a progress bar; ``desc``'s first word names the test-only
    crash point reached as each finishes ("embed", "index", "mine": curate/faults.py)."""
    from distributed import as_completed

    from curate import faults
    from curate.progress import track

    for _ in track(as_completed(futures), total=len(futures), desc=desc):
        faults.reached(desc.split()[0])
    return workers.client.gather(futures)
