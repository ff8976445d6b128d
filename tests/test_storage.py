"""Storage beyond the local disk (curate.storage): inputs read from s3:// and a run written to
s3://, against a real S3 server (moto's, started here on 127.0.0.1 and stopped at the end)
reached by a real s3fs. The s3 run's shards and manifest must be the bytes of a local run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from curate import storage  # noqa: E402
from curate.config import DataConfig, config_from_dict  # noqa: E402
from curate.errors import ConfigError, DataError, OutputDirError  # noqa: E402
from curate.read.dataset import read_dataset, read_table  # noqa: E402
from curate.read.synth import write_demo_dataset  # noqa: E402
from pipelines.run import run  # noqa: E402

BUCKET = "curate-test"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """moto's S3 server in its own process; -> (endpoint URL, its request recording)."""
    tmp = tmp_path_factory.mktemp("moto")
    port, recording = _free_port(), tmp / "requests.jsonl"
    env = {**os.environ, "MOTO_RECORDER_FILEPATH": str(recording)}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
            mp.delenv(name, raising=False)
        for name, value in CREDENTIALS.items():
            mp.setenv(name, value)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "moto did not start"
                time.sleep(0.2)
        try:
            yield endpoint, recording
        finally:
            proc.terminate()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def s3(server):
    """An s3fs filesystem on the server, with the bucket made."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=server[0])
    fs.mkdir(BUCKET)
    return fs


def _recorder(endpoint: str, action: str) -> None:
    req = urllib.request.Request(f"{endpoint}/moto-api/recorder/{action}", method="POST")
    urllib.request.urlopen(req, timeout=10).close()


def _puts(recording: Path, prefix: str) -> list[str]:
    """Object keys under ``prefix`` in the order the server received their PUTs."""
    keys = []
    for line in recording.read_text().splitlines():
        entry = json.loads(line)
        path = entry["url"].split("?")[0].split("/", 3)[3]  # http://host/<bucket/key>
        if entry["method"] == "PUT" and path.startswith(f"{BUCKET}/{prefix}/"):
            keys.append(path[len(f"{BUCKET}/{prefix}/") :])
    return keys


@pytest.fixture(scope="module")
def demo(tmp_path_factory, s3) -> tuple[Path, str]:
    """The demo BEIR folder, locally and in the bucket."""
    local = write_demo_dataset(tmp_path_factory.mktemp("data") / "demo", seed=0)
    s3.put(str(local), f"{BUCKET}/data/", recursive=True)
    return local, f"s3://{BUCKET}/data/demo"


def _config(out: str, data: str, model: Path, staging: Path, endpoint: str, **top) -> dict:
    return {
        "output_dir": out, "seed": 3, **top,
        "data": {"path": data, "eval_split": None},
        "embed": {"model": str(model), "max_length": 32, "partition_size": 200,
                  "dtype": "float32"},
        "mine": {"top_k": 20, "num_negatives": 3, "range_max": 20, "max_relative": None,
                 "near_dup_threshold": 0.99999},
        "batch": {"batch_size": 8, "batches_per_shard": 2},
        "train": {"enabled": False}, "eval": {"enabled": False},
        "cluster": {"workers": "in_process"},
        "storage": {"options": {"s3": {"endpoint_url": endpoint}}, "staging_dir": str(staging)},
    }  # fmt: skip


def _without_places(manifest: dict) -> dict:
    for key in ("output_dir", "cache_dir", "storage"):
        manifest["config"].pop(key)
    manifest["config"]["data"].pop("path")
    return manifest


@pytest.fixture(scope="module")
def runs(tmp_path_factory, server, s3, demo, tiny_model) -> dict:
    """The same config run locally and on s3 (inputs, output and cache); the s3 run recorded."""
    endpoint, recording = server
    tmp = tmp_path_factory.mktemp("runs")
    local = _config(str(tmp / "local"), str(demo[0]), tiny_model, tmp / "staging", endpoint)
    url = f"s3://{BUCKET}/runs/a"
    remote = _config(url, demo[1], tiny_model, tmp / "staging", endpoint,
                     cache_dir=f"s3://{BUCKET}/cache")  # fmt: skip
    local_result = run(config_from_dict(local))
    _recorder(endpoint, "start-recording")
    try:
        remote_result = run(config_from_dict(remote))
    finally:
        _recorder(endpoint, "stop-recording")
    return {"local": Path(local_result["output_dir"]), "url": url, "remote": remote,
            "result": remote_result, "puts": _puts(recording, "runs/a")}  # fmt: skip


def test_s3_run_writes_the_bytes_of_a_local_run(runs, s3):
    local, url = runs["local"], runs["url"]
    key = url.removeprefix("s3://")
    manifest = json.loads((local / "manifest.json").read_text())
    names = [f["path"] for f in manifest["files"]]
    assert len(names) > 1 and s3.ls(f"{key}/shards", detail=False) == sorted(
        f"{key}/shards/{n}" for n in names
    )
    for name in names:
        assert s3.cat_file(f"{key}/shards/{name}") == (local / "shards" / name).read_bytes()
    assert s3.cat_file(f"{key}/forbidden.parquet") == (local / "forbidden.parquet").read_bytes()
    remote_manifest = json.loads(s3.cat_file(f"{key}/manifest.json"))
    assert remote_manifest["config"]["output_dir"] == url  # the URL, not the staging folder
    assert _without_places(remote_manifest) == _without_places(manifest)
    report = json.loads(s3.cat_file(f"{key}/report.json"))
    assert report["output_dir"] == url and runs["result"]["shards"] == f"{url}/shards"
    assert s3.isfile(f"{key}/.curate-run")


def test_the_manifest_is_uploaded_after_every_shard(runs):
    puts = runs["puts"]
    shards = [k for k in puts if k.startswith("shards/")]
    assert shards and "manifest.json" in puts and "report.json" in puts
    assert puts[-1] == "manifest.json" and puts.count("manifest.json") == 1
    assert puts.index("manifest.json") > max(puts.index(k) for k in [*shards, "report.json"])


def test_the_cache_at_a_url_is_uploaded_and_pulled_by_a_new_machine(runs, s3, tmp_path):
    cached = s3.find(f"{BUCKET}/cache")
    assert any(k.endswith(".parquet") for k in cached)
    # Another machine: an empty staging folder is filled from the bucket before the embed stage.
    cfg = config_from_dict(
        {**runs["remote"], "storage": {**runs["remote"]["storage"], "staging_dir": str(tmp_path)}}
    )
    folder = storage.cache_folder(cfg, tmp_path / "unused")
    got = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert got == sorted(k.removeprefix(f"{BUCKET}/cache/") for k in cached)
    for name in got:
        assert (folder / name).read_bytes() == s3.cat_file(f"{BUCKET}/cache/{name}")


def test_a_rerun_removes_only_the_stale_shards_curate_listed(runs, s3):
    key = runs["url"].removeprefix("s3://")
    manifest = json.loads(s3.cat_file(f"{key}/manifest.json"))
    # An earlier run of the prefix listed one more shard; another program left one beside them.
    manifest["files"].append({"path": "shard-00042.parquet", "batches": 1, "rows": 1})
    s3.pipe(f"{key}/manifest.json", json.dumps(manifest).encode())
    s3.pipe(f"{key}/shards/shard-00042.parquet", b"an earlier run's shard")
    s3.pipe(f"{key}/shards/shard-00099.parquet", b"not curate's")
    run(config_from_dict(runs["remote"]))  # the same staging folder: every stage cached
    left = {k.rsplit("/", 1)[1] for k in s3.ls(f"{key}/shards", detail=False)}
    assert "shard-00042.parquet" not in left and "shard-00099.parquet" in left
    s3.rm_file(f"{key}/shards/shard-00099.parquet")


def test_a_prefix_holding_a_foreign_object_is_refused(runs, s3, tmp_path):
    s3.pipe(f"{BUCKET}/theirs/notes.txt", b"someone else's")
    cfg = config_from_dict({**runs["remote"], "output_dir": f"s3://{BUCKET}/theirs"})
    with pytest.raises(OutputDirError) as info:
        run(cfg)
    message = str(info.value)
    assert f"s3://{BUCKET}/theirs is not empty" in message and "notes.txt" in message
    assert "--overwrite" in message and ".curate-run" in message
    assert s3.ls(f"{BUCKET}/theirs", detail=False) == [f"{BUCKET}/theirs/notes.txt"]


def test_a_malformed_jsonl_line_in_s3_names_the_url_and_line(s3, demo, monkeypatch, server):
    source = demo[0]
    lines = (source / "corpus.jsonl").read_bytes().splitlines(keepends=True)
    lines[2] = b'{"_id": "broken", "text": \n'
    s3.pipe(f"{BUCKET}/bad/corpus.jsonl", b"".join(lines))
    s3.put_file(str(source / "queries.jsonl"), f"{BUCKET}/bad/queries.jsonl")
    s3.put(str(source / "qrels"), f"{BUCKET}/bad/", recursive=True)
    monkeypatch.setenv("AWS_ENDPOINT_URL", server[0])  # the environment's route, no options
    with pytest.raises(DataError) as info:
        read_dataset(DataConfig(path=f"s3://{BUCKET}/bad/", eval_split=None))
    assert info.value.file == f"s3://{BUCKET}/bad/corpus.jsonl" and info.value.row == 3
    assert "malformed JSON" in str(info.value) and "1-based line number" in str(info.value)


def test_parquet_and_tsv_from_s3_read_as_locally(s3, demo, server, tmp_path):
    import polars as pl

    options = {"s3": {"endpoint_url": server[0]}}
    pl.read_ndjson(demo[0] / "corpus.jsonl").write_parquet(tmp_path / "corpus.parquet")
    s3.put_file(str(tmp_path / "corpus.parquet"), f"{BUCKET}/pq/corpus.parquet")
    remote = read_table(f"s3://{BUCKET}/pq/corpus.parquet", "corpus", options=options)
    assert remote.equals(read_table(tmp_path / "corpus.parquet", "corpus"))
    qrels = read_table(f"{demo[1]}/qrels/train.tsv", "qrels", options=options)
    assert qrels.equals(read_table(demo[0] / "qrels" / "train.tsv", "qrels"))
    assert remote.height == 480


def test_missing_inputs_and_urls_are_named(s3, server):
    options = {"s3": {"endpoint_url": server[0]}}
    with pytest.raises(DataError, match=f"s3://{BUCKET}/nothing-here: data folder not found"):
        read_dataset(DataConfig(path=f"s3://{BUCKET}/nothing-here"), options=options)
    with pytest.raises(ConfigError, match="nosuchfs://x: curate cannot open nosuchfs://"):
        storage.filesystem("nosuchfs://x")


def test_credentials_in_the_config_are_refused():
    with pytest.raises(ConfigError, match=r"storage.options.s3: \['secret'\] hold credentials"):
        config_from_dict({"storage": {"options": {"s3": {"secret": "abc", "anon": False}}}})
    with pytest.raises(ConfigError, match="storage.options.s3: expected a mapping"):
        config_from_dict({"storage": {"options": {"s3": "http://127.0.0.1:9000"}}})
    cfg = config_from_dict({"output_dir": "file:///tmp/run", "storage": {"options": {}}})
    assert not storage.is_url(cfg.output_dir) and storage.output_folder(cfg) == Path("/tmp/run")


def test_a_prefix_curate_cannot_write_fails_when_claimed(server, s3, tmp_path):
    options = {"s3": {"endpoint_url": server[0]}}
    cfg = config_from_dict(
        {"output_dir": "s3://no-such-bucket/run", "storage": {"options": options}}
    )
    storage.check_output(cfg, tmp_path / "staging")  # nothing there: accepted, nothing created
    (tmp_path / ".curate-run").write_text("{}")
    with pytest.raises(OutputDirError, match=r"cannot write s3://no-such-bucket/run/\.curate-run"):
        storage.claim(cfg, tmp_path)
    assert not (tmp_path / "staging").exists()


def test_given_vectors_read_from_s3_as_locally(s3, server, tmp_path):
    """Bring-your-own embeddings behind a URL: the workers read the vector column by range
    requests, and index the same unit vectors as from the local copy."""
    import numpy as np

    from tests.test_vectors import _config, _write

    local = tmp_path / "data"
    local.mkdir()
    _write(local)
    s3.put(str(local), f"{BUCKET}/vectors", recursive=True)
    runs = {}
    for name, data in (("local", str(local)), ("s3", f"s3://{BUCKET}/vectors")):
        cfg = _config(data, tmp_path / name).to_dict()
        cfg["storage"] = {"options": {"s3": {"endpoint_url": server[0]}}}
        run(config_from_dict(cfg), quiet=True)
        runs[name] = np.load(tmp_path / name / "work" / "doc_vecs.npy")
    np.testing.assert_array_equal(runs["s3"], runs["local"])
    shards = {n: sorted(p.read_bytes() for p in (tmp_path / n / "shards").glob("*.parquet"))
              for n in runs}  # fmt: skip
    assert shards["s3"] == shards["local"]
