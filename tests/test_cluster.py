"""A real cluster: ``dask scheduler`` and two ``dask worker`` processes started from the command
line (not a LocalCluster), the pipeline run against the scheduler's address while one worker
SIGKILLs itself mid-embed (``curate.faults``; its nanny starts it again), and the output compared
byte for byte with a LocalCluster run of the same config. A scheduler plugin
(``pipelines.traffic``) measures every task's argument and result on the way."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from slice_data import output_bytes, pipeline_config, write_slice

from curate import faults
from curate.config import config_from_dict
from pipelines import run as run_mod
from pipelines import traffic

REPO = Path(__file__).resolve().parents[1]
DASK = Path(sys.executable).with_name("dask")  # the venv's CLI, as a user would start it
# Two single-threaded workers, both runs: tasks get the same torch thread count (cores // 2) on
# the CLI cluster (pipelines.cluster.connect divides by the workers it finds) and on the
# LocalCluster, so the floats, and so the bytes, agree.
CLUSTER = {"n_workers": 2, "threads_per_worker": 1}
START_WAIT_S = 120  # a bound on process start-up, not a speed claim: 2 loaded cores


@dataclass(frozen=True)
class ClusterRun:
    out: Path
    traffic: dict  # pipelines.traffic.traffic()
    killed: bool  # the armed worker reached its crash point (its marker file exists)
    pids_replaced: bool  # a worker process present before the run is gone after it


def _config(out: Path, data: Path, model: Path, **cluster) -> dict:
    # Several embed partitions (3 of docs, 1 of queries here) so the kill lands mid-stage; no
    # train, no eval.
    return pipeline_config(out, data, model, cluster={**CLUSTER, **cluster})


def _compared(out: Path) -> dict:
    """The output's bytes; the manifest's config without what names the run's place: the output
    folder and the scheduler's address (the rest of the cluster section must agree)."""
    got = output_bytes(out)
    got["manifest.json"]["config"]["cluster"].pop("scheduler")
    return got


@pytest.fixture(scope="module")
def data(tmp_path_factory, cranfield) -> Path:
    return write_slice(tmp_path_factory.mktemp("slice"), cranfield)


# --- the CLI-started cluster ----------------------------------------------------------------


def _start(cmd: list[str], log: Path, env: dict, cwd: Path) -> subprocess.Popen:
    """A process in its own session, so stopping its group also stops a nanny's worker."""
    with open(log, "wb") as fh:
        return subprocess.Popen([str(c) for c in cmd], stdout=fh, stderr=subprocess.STDOUT,
                                env=env, cwd=cwd, start_new_session=True)  # fmt: skip


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each process group (workers first), then SIGKILL what is left of it."""
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the group outlives its leader while members live
        except ProcessLookupError:
            pass
        p.wait()


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else f"{log}: no log"


def _address(sched_file: Path, proc: subprocess.Popen, log: Path) -> str:
    """The scheduler's address once it has written its file (port 0: chosen at start)."""
    deadline = time.monotonic() + START_WAIT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"dask scheduler exited with {proc.returncode}:\n{_tail(log)}")
        try:
            return json.loads(sched_file.read_text())["address"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            time.sleep(0.2)  # not written yet, or half written
    pytest.fail(f"dask scheduler wrote no {sched_file} in {START_WAIT_S}s:\n{_tail(log)}")


def _env(once: Path | None = None) -> dict:
    """This environment with the repository importable; the crash point only where ``once``."""
    env = {k: v for k, v in os.environ.items() if k not in (faults.ENV, faults.ONCE_ENV)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if once is not None:
        env.update({faults.ENV: "embed_task:1", faults.ONCE_ENV: str(once)})
    return env


# The idle and death timeouts only matter if this process dies without its finalizer (a CI
# job's SIGKILL): the scheduler then closes after 10 idle minutes and its workers a minute later.
def _scheduler_cmd(sched_file: Path) -> list:
    return [DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--scheduler-file",
            sched_file, "--no-dashboard", "--idle-timeout", "600"]  # fmt: skip


def _worker_cmd(sched_file: Path, local_dir: Path) -> list:
    return [DASK, "worker", "--scheduler-file", sched_file, "--nworkers", "1", "--nthreads", "1",
            "--no-dashboard", "--local-directory", local_dir, "--death-timeout", "60"]  # fmt: skip


@pytest.fixture(scope="module")
def cli_cluster(tmp_path_factory):
    """-> (client, address, crash marker folder). Worker 0 carries the crash point in its
    environment: it SIGKILLs itself while embedding its first partition, once (the marker)."""
    from distributed import Client

    logging.getLogger("distributed").setLevel(logging.ERROR)
    root = tmp_path_factory.mktemp("cli-cluster")
    sched_file, once = root / "scheduler.json", root / "once"
    once.mkdir()
    procs: list[subprocess.Popen] = []  # workers first: they are stopped in this order
    client = None
    try:
        log = root / "scheduler.log"
        procs.append(_start(_scheduler_cmd(sched_file), log, _env(), root))
        address = _address(sched_file, procs[0], log)
        for w in range(2):
            env = _env(once if w == 0 else None)
            cmd = _worker_cmd(sched_file, root / f"w{w}")
            procs.insert(0, _start(cmd, root / f"worker{w}.log", env, root))
        client = Client(address)
        try:
            client.wait_for_workers(2, timeout=START_WAIT_S)
        except TimeoutError:
            logs = "\n".join(_tail(root / f"worker{w}.log") for w in range(2))
            pytest.fail(f"two dask workers did not join {address} in {START_WAIT_S}s:\n{logs}")
        yield client, address, once
    finally:
        if client is not None:
            client.close()
        _stop(procs)


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory, cli_cluster, data, tiny_model) -> ClusterRun:
    client, address, once = cli_cluster
    out = tmp_path_factory.mktemp("on-cli-cluster") / "out"
    traffic.register(client)
    before = set(client.run(os.getpid).values())
    run_mod.run(config_from_dict(_config(out, data, tiny_model, scheduler=address)), quiet=True)
    client.wait_for_workers(2, timeout=START_WAIT_S)  # the nanny's new worker, for the pids
    after = set(client.run(os.getpid).values())
    return ClusterRun(out, traffic.traffic(client), (once / "embed_task-1").exists(),
                      bool(before - after))  # fmt: skip


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, data, tiny_model) -> Path:
    out = tmp_path_factory.mktemp("on-local-cluster") / "out"
    run_mod.run(config_from_dict(_config(out, data, tiny_model)), quiet=True)
    return out


def test_cli_cluster_with_a_killed_worker_gives_the_local_cluster_bytes(cluster_run, local_run):
    assert cluster_run.killed, "the armed worker never reached its crash point: no worker died"
    assert cluster_run.pids_replaced, "the killed worker's process is still there"
    assert cluster_run.traffic["prefixes"]["embed"]["tasks"] > 2  # the kill was mid-stage
    got = _compared(cluster_run.out)
    assert sum(name.startswith("shard-") for name in got) >= 2, f"{cluster_run.out}: few shards"
    assert got == _compared(local_run)


# The scheduler carries no data: a task names its inputs (paths, row ranges, frozen configs of
# about 250-300 B pickled) and returns a path or a count. 4 KiB leaves room for long paths and
# the embedding plan's batch sizes, and stays under what one partition of data weighs even at
# this test's small scale, so a task that carries data fails it: before issue #15 a mine block's
# query vectors and ids were ~5 KB, a search chunk's queries ~6 KB and hits ~9.6 KB, an embed
# partition's texts ~190 KB and a tokenizing chunk's ~495 KB.
MAX_TASK_BYTES = 4 * 1024


def test_the_scheduler_carries_no_data(cluster_run):
    prefixes = cluster_run.traffic["prefixes"]
    # compose: the batch stage's rows and batches, built in a task and not in the driver
    assert {"embed", "mine", "compose", "shards"} <= prefixes.keys(), \
        f"the meter missed tasks: {sorted(prefixes)}"
    assert all(p["results"] == p["tasks"] for p in prefixes.values()), prefixes
    too_big = {
        name: {"arg_max": p["arg_max"], "result_max": p["result_max"]}
        for name, p in prefixes.items()
        if max(p["arg_max"], p["result_max"]) > MAX_TASK_BYTES
    }
    assert not too_big, f"task arguments or results over {MAX_TASK_BYTES} B: {too_big}"
