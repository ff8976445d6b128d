"""Crash safety on a Cranfield slice: SIGKILL the driver mid-embed, mid-mine and mid-shard-write
(``curate.faults``), rerun, and get the uninterrupted run's bytes; SIGKILL one Dask worker
mid-embed and get them too. No file under its final name is ever partial."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from slice_data import PATH_LIKE_DOC, PATH_LIKE_QUERY, output_bytes, pipeline_config, write_slice

from curate import faults, schema
from curate.batch import shards
from curate.config import config_from_dict
from curate.files import sha256
from pipelines import run as run_mod
from pipelines.cluster import Workers

REPO = Path(__file__).resolve().parents[1]
# The subprocess runs start their own LocalCluster of one single-threaded worker; in-process runs
# share one 2-worker cluster. Tasks get the same torch thread count in both, so the floats agree.
SUBPROCESS_CLUSTER = {"n_workers": 1, "threads_per_worker": 1}
TORCH_THREADS = os.cpu_count() or 1  # pipelines.cluster's choice for 1 worker x 1 thread


@pytest.fixture(scope="module")
def data(tmp_path_factory, cranfield) -> Path:
    return write_slice(tmp_path_factory.mktemp("slice"), cranfield)


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.ERROR)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as c:  # fmt: skip
        yield c


@pytest.fixture(scope="module")
def run_here(client):
    """``pipelines.run.run`` in this process on the module's cluster (one cluster start for all)."""

    @contextmanager
    def connect(cfg, quiet=False, texts=None):
        yield Workers(client, 2, TORCH_THREADS)

    def go(cfg: dict) -> dict:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(run_mod, "connect", connect)
            return run_mod.run(config_from_dict(cfg), quiet=True)

    return go


def _config(out: Path, data: Path, model: Path) -> dict:
    return pipeline_config(out, data, model, cluster=SUBPROCESS_CLUSTER)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, run_here, data, tiny_model) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    run_here(_config(out, data, tiny_model))
    return out


def _assert_whole(out: Path) -> None:
    """Every file under its final name reads in full; temp files never carry a final name."""
    for p in out.rglob("*"):
        if not p.is_file() or p.name.endswith(".tmp"):
            continue
        if p.suffix == ".parquet":
            pq.read_table(p)
        elif p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".npy":
            np.load(p, allow_pickle=False)
        elif p.suffix == ".faiss":
            faiss.read_index(str(p))
        elif p.suffix == ".arrow":
            pa.ipc.open_file(pa.memory_map(str(p))).read_all()
    manifest = shards.manifest_path(out / "shards")
    if manifest.is_file():  # a manifest present means every file it names is complete
        for rec in json.loads(manifest.read_text())["files"]:
            assert sha256(out / "shards" / rec["path"]) == rec["sha256"]


def _crash(cfg_path: Path, cwd: Path, point: str) -> None:
    """``curate batch`` in a subprocess (own session) that SIGKILLs itself at ``point``."""
    env = {**os.environ, faults.ENV: point, "PYTHONPATH": str(REPO)}
    env.pop(faults.ONCE_ENV, None)
    cmd = [sys.executable, "-m", "curate", "batch", "-c", str(cfg_path), "-q"]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        survivors = _reap_group(proc.pid)
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    assert f"fault injection: SIGKILL at {point}" in err, err[-3000:]
    assert not survivors, "worker processes outlived the killed driver"


def _reap_group(pgid: int, wait: float = 15.0) -> bool:
    """Did processes of the session we started outlive its leader? (Killed here if so.)"""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.2)
    os.killpg(pgid, signal.SIGKILL)
    return True


def _stats(paths) -> dict:
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}


def test_driver_killed_mid_embed_mine_and_shards_resumes_to_same_bytes(
    tmp_path, data, tiny_model, baseline, run_here
):
    out, cwd = tmp_path / "out", tmp_path / "cwd"
    cwd.mkdir()
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(out, data, tiny_model)))

    # 1. Mid-embed: the driver dies after the 2nd document partition is written.
    _crash(cfg_path, cwd, "embed:2")
    _assert_whole(out)
    embedded = sorted((out / "cache" / "docs").glob("*.parquet"))
    assert len(embedded) >= 2 and not (out / "work" / "index.json").exists()
    kept = _stats(embedded)

    # 2. Mid-mine: the rerun embeds only what is missing, then dies after the 2nd mined block.
    _crash(cfg_path, cwd, "mine:2")
    _assert_whole(out)
    assert _stats(embedded) == kept, "finished embedding partitions were recomputed"
    mined = sorted((out / "work" / "mined").glob("*[0-9a-f].parquet"))
    assert len(mined) >= 2 and not (out / "shards").exists()
    kept = _stats([*mined, out / "work" / "index.faiss"])

    # 3. Mid-shard-write: dies after the 3rd shard file is renamed into place.
    _crash(cfg_path, cwd, "shard:3")
    _assert_whole(out)
    assert _stats(kept) == kept, "finished mine partitions or the index were recomputed"
    assert len(list((out / "shards").glob("shard-*.parquet"))) == 3
    assert not (out / shards.MANIFEST).exists()  # no manifest: not complete
    assert not (out / "forbidden.parquet").exists()

    # 4. A clean rerun gives the uninterrupted run's bytes and leaves no temp file behind.
    run_here(_config(out, data, tiny_model))
    _assert_whole(out)
    assert output_bytes(out) == output_bytes(baseline)
    assert not list(out.rglob("*.tmp"))
    assert not list(cwd.iterdir()), "a run wrote into its working directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml", "cwd", "out"]


def test_lost_worker_mid_embed_gives_same_bytes(tmp_path, client, run_here, baseline, data,
                                                tiny_model, monkeypatch):  # fmt: skip
    once = tmp_path / "once"
    once.mkdir()
    # The worker that embeds its 2nd partition SIGKILLs itself before writing it; the nanny starts
    # a new worker (which inherits this environment, and the marker keeps it alive) and Dask
    # reruns the lost task.
    monkeypatch.setenv(faults.ENV, "embed_task:2")
    monkeypatch.setenv(faults.ONCE_ENV, str(once))
    client.run(faults.arm, "embed_task:2", str(once))
    before = set(client.run(os.getpid).values())
    try:
        run_here(_config(tmp_path / "out", data, tiny_model))
    finally:
        client.wait_for_workers(2, timeout=60)
        client.run(faults.arm, "")
    assert (once / "embed_task-2").exists(), "no worker was killed"
    assert before - set(client.run(os.getpid).values()), "the killed worker is still there"
    _assert_whole(tmp_path / "out")
    assert output_bytes(tmp_path / "out") == output_bytes(baseline)


def test_uninterrupted_run_counts_skips_and_never_names_files_by_id(baseline):
    counts = json.loads((baseline / shards.MANIFEST).read_text())["counts"]
    assert counts["skipped_empty_docs"] == 2  # Cranfield's docs 471 and 995 (empty_text: skip)
    rows = [
        r
        for f in sorted((baseline / "shards").glob("shard-*.parquet"))
        for r in pq.read_table(f).to_pylist()
    ]
    seen = {r["query_id"] for r in rows} | {d for r in rows for d in [r["pos_id"], *r["neg_ids"]]}
    assert {PATH_LIKE_QUERY, PATH_LIKE_DOC} <= seen  # path-like ids went all the way through
    assert not [p for p in baseline.parent.rglob("*") if "escape" in p.name or p.name == "query"]


def test_crash_while_rewriting_shards_leaves_no_stale_manifest(tmp_path, monkeypatch):
    rows = [{"batch_id": b, "query_id": f"q{b}", "query": "q", "pos_id": f"p{b}", "pos": "p",
             "pos_score": 0.5, "neg_ids": [], "negs": [], "neg_scores": [], "neg_ranks": [],
             "topic": 0, "known_pos_ids": [f"p{b}"]} for b in range(4)]  # fmt: skip
    table = pa.Table.from_pylist(rows, schema=schema.SHARD)
    shard_dir = tmp_path / "shards"
    files = shards.write_shards(table, shard_dir, batches_per_shard=1)
    shards.write_manifest(shard_dir, {"files": files})

    def crash(point):
        if point == "shard" and len(list(shard_dir.glob("shard-*.parquet"))) == 2:
            raise KeyboardInterrupt("injected crash")

    monkeypatch.setattr(faults, "reached", crash)
    with pytest.raises(KeyboardInterrupt):
        shards.write_shards(table.slice(0, 3), shard_dir, batches_per_shard=1)
    # The old manifest would describe 4 shards over a half-rewritten folder: it must be gone.
    assert not shards.manifest_path(shard_dir).exists()
    _assert_whole(tmp_path)
