"""A Dask cluster started from the command line for ``benchmarks/pipeline_scale.py``
(``dask scheduler`` + ``dask worker`` processes on 127.0.0.1, stopped after), and what its
scheduler carried (``pipelines.traffic``'s meter, put there by ``traffic_preload.py``)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRELOAD = Path(__file__).with_name("traffic_preload.py")
TRAFFIC_ENV = "CURATE_BENCH_TRAFFIC_OUT"  # where the preload writes the scheduler's record


def metered() -> bool:
    """Whether this curate has the scheduler traffic meter (``pipelines.traffic``)."""
    return importlib.util.find_spec("pipelines.traffic") is not None


def preload_args() -> list[str]:
    return ["--preload", str(PRELOAD)] if metered() else []


def preload_env() -> dict[str, str]:
    """dask config for a scheduler started inside another program (curate run's
    LocalCluster), which the benchmark cannot pass arguments to."""
    return {"DASK_DISTRIBUTED__SCHEDULER__PRELOAD": json.dumps([str(PRELOAD)])} if metered() else {}


@dataclass
class CliCluster:
    address: str
    scheduler: subprocess.Popen
    workers: list[subprocess.Popen]

    def roots(self) -> dict[int, str]:
        return {self.scheduler.pid: "scheduler"} | {w.pid: "nanny" for w in self.workers}


def dask_cli() -> list[str]:
    exe = Path(sys.executable).with_name("dask")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "distributed.cli.dask"]


def worker_env() -> dict[str, str]:
    """What ``curate run`` sets for its own LocalCluster workers (pipelines.cluster), so the two
    modes run the same tasks under the same allocator."""
    return {
        **os.environ,
        "ARROW_DEFAULT_MEMORY_POOL": "system",
        "CURATE_NO_PROGRESS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


@contextmanager
def cli_cluster(folder: Path, n_workers: int = 2, threads: int = 1, timeout: float = 120):
    """``dask scheduler`` (with the traffic preload) and ``n_workers`` ``dask worker``
    processes on 127.0.0.1, logs in ``folder``; stopped (SIGTERM, then SIGKILL) on exit."""
    folder.mkdir(parents=True, exist_ok=True)
    sched_file = folder / "scheduler.json"
    sched_file.unlink(missing_ok=True)
    env, procs = worker_env(), []
    try:
        sched = ["scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", ":0"]
        sched += ["--scheduler-file", str(sched_file), *preload_args()]
        procs.append(_start([*dask_cli(), *sched], folder / "scheduler.log", env))
        address = _wait_address(sched_file, procs[0], timeout)
        for i in range(n_workers):
            procs.append(
                _start(
                    [
                        *dask_cli(),
                        "worker",
                        address,
                        "--host",
                        "127.0.0.1",
                        "--nthreads",
                        str(threads),
                        "--nworkers",
                        "1",
                        "--no-dashboard",
                        "--name",
                        f"bench-{i}",
                    ],
                    folder / f"worker-{i}.log",
                    env,
                )
            )
        _wait_workers(address, n_workers, timeout)
        yield CliCluster(address, procs[0], procs[1:])
    finally:
        for p in reversed(procs):  # workers first, so the scheduler sees them leave
            _stop(p)


def _start(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    """In its own session, so stopping the group also stops the worker a nanny started."""
    with open(log, "wb") as fh:
        return subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
        )


def _wait_address(sched_file: Path, proc: subprocess.Popen, timeout: float) -> str:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"dask scheduler exited with {proc.returncode}; see its log")
        if sched_file.is_file():
            try:
                return json.loads(sched_file.read_text())["address"]
            except (json.JSONDecodeError, KeyError):
                pass  # being written
        time.sleep(0.2)
    raise TimeoutError(f"dask scheduler wrote no {sched_file} in {timeout:.0f}s")


def _wait_workers(address: str, n: int, timeout: float) -> None:
    from distributed import Client

    with Client(address, timeout=timeout) as client:
        client.wait_for_workers(n, timeout=timeout)


def _stop(proc: subprocess.Popen, grace: float = 15) -> None:
    """SIGTERM to the process's group (it closes cleanly: the scheduler's preload teardown
    runs), SIGKILL to what is left of the group after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


def fetch_traffic(address: str) -> dict | None:
    """The traffic record of a running scheduler (its meter added by the preload); None
    without ``pipelines.traffic``."""
    if not metered():
        return None
    from distributed import Client

    from pipelines.traffic import traffic

    with Client(address, timeout=60) as client:
        return traffic(client)


def traffic_fields(record: dict | None) -> dict:
    """Bytes through the scheduler and the largest task argument / result (with their stage)."""
    if not record:
        return {
            "scheduler_bytes": None,
            "largest_arg_bytes": None,
            "largest_arg_stage": None,
            "largest_result_bytes": None,
            "largest_result_stage": None,
            "traffic": None,
        }
    prefixes = record["prefixes"]
    arg = max(prefixes.items(), key=lambda kv: kv[1]["arg_max"], default=(None, {"arg_max": 0}))
    res = max(
        prefixes.items(), key=lambda kv: kv[1]["result_max"], default=(None, {"result_max": 0})
    )
    return {
        "scheduler_bytes": record["total_bytes"],
        "largest_arg_bytes": arg[1]["arg_max"],
        "largest_arg_stage": arg[0],
        "largest_result_bytes": res[1]["result_max"],
        "largest_result_stage": res[0],
        "traffic": record,
    }
