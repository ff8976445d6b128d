"""Measuring a pipeline run from outside, for ``benchmarks/pipeline_scale.py``: peak memory per
process of the run's tree, and the machine.

Peak memory is the kernel's high-water mark of each process (``VmHWM`` in /proc/<pid>/status),
read every ``every`` seconds: it is exact up to the last read before a process exits, unlike a
sampled RSS, which misses spikes between samples.
"""

from __future__ import annotations

import os
import platform
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


def _status_kb(pid: int, field_name: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def role_of(proc: psutil.Process, roots: dict[int, str]) -> str:
    """driver / scheduler / nanny: the processes the benchmark started (``roots``); worker: a
    process Dask spawned (multiprocessing's spawn_main, a nanny's or LocalCluster's child)."""
    if proc.pid in roots:
        return roots[proc.pid]
    try:
        cmd = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "other"
    # spawn_main until the worker sets its title (setproctitle) to "dask worker [address]"
    if "spawn_main" in cmd or "dask worker [" in cmd:
        return "worker"
    return "other"  # multiprocessing's resource tracker, or a child not yet exec'd


@dataclass
class Seen:
    role: str
    peak_kb: int = 0


@dataclass
class TreeSampler:
    """Peak memory of every process under ``roots`` (pid -> role), read every ``every`` s in a
    thread; a process that appears later (a worker restarted) is added when first seen."""

    roots: dict[int, str]
    every: float = 0.2
    seen: dict[int, Seen] = field(default_factory=dict)
    peak_tree_kb: int = 0  # the largest sum of current RSS over the tree at one sample

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def add_root(self, pid: int, role: str) -> None:
        self.roots[pid] = role

    def sample(self) -> None:
        total = 0
        for proc in self._tree():
            hwm, rss = _status_kb(proc.pid, "VmHWM"), _status_kb(proc.pid, "VmRSS")
            if hwm is None:
                continue
            entry = self.seen.setdefault(proc.pid, Seen("other"))
            if entry.role == "other":  # a child seen between fork and exec has no role yet
                entry.role = role_of(proc, self.roots)
            entry.peak_kb = max(entry.peak_kb, hwm)
            total += rss or 0
        self.peak_tree_kb = max(self.peak_tree_kb, total)

    def _tree(self) -> list[psutil.Process]:
        out = []
        for pid in list(self.roots):
            try:
                root = psutil.Process(pid)
                out += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        return out

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        """Peaks in MB: the driver, the scheduler (CLI cluster), each worker, the tree sum."""
        mb = {pid: round(s.peak_kb / 1024, 1) for pid, s in self.seen.items()}
        by_role = lambda role: sorted(mb[p] for p, s in self.seen.items() if s.role == role)  # noqa: E731
        workers = by_role("worker")
        return {
            "driver_peak_rss_mb": max(by_role("driver"), default=None),
            "scheduler_peak_rss_mb": max(by_role("scheduler"), default=None),
            "worker_peak_rss_mb": max(workers, default=None),
            "workers_peak_rss_mb": workers,
            "nanny_peak_rss_mb": max(by_role("nanny"), default=None),
            "tree_peak_rss_mb": round(self.peak_tree_kb / 1024, 1),
            "processes": [
                {"pid": p, "role": s.role, "peak_rss_mb": mb[p]}
                for p, s in sorted(self.seen.items())
            ],
        }


# --- the machine ---------------------------------------------------------------------------


def machine() -> dict:
    """CPU model and the flags that decide curate's kernels, cores, memory, load, versions."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next(
        (ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")),
        platform.processor() or platform.machine(),
    )
    flags = set(
        next(
            (ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []
        )
    )
    mem_kb = _meminfo_kb("MemTotal")
    return {
        "cpu": model,
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_kb / 2**20, 1) if mem_kb else None,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "versions": _versions(),
        "commit": _git_commit(),
    }


def _meminfo_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except FileNotFoundError:
        return None
    return None


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("dask", "distributed", "faiss-cpu", "pyarrow", "polars", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
