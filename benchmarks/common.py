"""Shared by the benchmark scripts: Cranfield texts as the pipeline embeds them, a process-tree
memory sampler, and a runner that measures one side of a comparison in its own subprocess."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
CRANFIELD = DATA / "cranfield"


def cranfield(split: str | None = None):
    """(doc_ids, doc_texts, query_ids, query_texts, qrels) read by curate's own reader; texts are
    joined exactly as the pipeline embeds them (``curate.read.stage.doc_texts``)."""
    from curate.config import DataConfig
    from curate.read.dataset import read_dataset
    from curate.read.stage import doc_texts

    ds = read_dataset(DataConfig(path=str(CRANFIELD), empty_text="skip"))
    qrels = ds.qrels[split] if split else None
    return (
        ds.corpus["doc_id"].to_list(),
        doc_texts(ds.corpus),
        ds.queries["query_id"].to_list(),
        ds.queries["text"].to_list(),
        qrels,
    )


class TreeMemory:
    """Samples the summed RSS and PSS of this process and all its descendants every ``every`` s
    and keeps the peaks (Dask workers are separate processes, so one process's ru_maxrss would
    under-count them). PSS splits shared pages (torch's libraries) fairly between processes."""

    def __init__(self, pid: int | None = None, every: float = 0.1):
        import psutil

        self.proc = psutil.Process(pid or os.getpid())
        self.every, self.peak_rss, self.peak_pss = every, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        rss = pss = 0
        try:
            procs = [self.proc, *self.proc.children(recursive=True)]
        except psutil.NoSuchProcess:  # the measured process has exited
            return
        for p in procs:
            try:
                info = p.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rss, pss = rss + info.rss, pss + getattr(info, "pss", info.rss)
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def run_side(args: list[str], env: dict | None = None) -> dict:
    """Run ``python args...`` in a fresh subprocess; -> its JSON result (last stdout line) plus
    wall time, CPU seconds of the whole process tree (getrusage of reaped children) and the
    peak summed RSS/PSS of the tree sampled from outside."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={
            **os.environ,
            "CURATE_NO_PROGRESS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            **(env or {}),
        },
    )
    mem = TreeMemory(proc.pid)
    with mem:
        out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{args} failed with exit code {proc.returncode}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = json.loads(out.strip().splitlines()[-1])
    result.update(
        wall_s=round(wall, 2),
        cpu_s=round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 2),
        peak_rss_mb=round(mem.peak_rss / 2**20),
        peak_pss_mb=round(mem.peak_pss / 2**20),
    )
    return result


def machine() -> str:
    import platform

    load = os.getloadavg()
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other "
        f"jobs; load average at start {load[0]:.1f})"
    )
