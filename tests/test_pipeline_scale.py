"""benchmarks/pipeline_scale.py at a tiny N: the synthetic corpus generator, the process-tree
memory sampler, the merge of results by (N, mode), and one real ``curate run`` on a
LocalCluster measured from outside into a JSON and a plot under tmp_path."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import pipeline_scale  # noqa: E402
from scale_cluster import cli_cluster, fetch_traffic, metered, traffic_fields  # noqa: E402
from scale_corpus import DUP_EVERY, CorpusSpec, ensure_corpus  # noqa: E402
from scale_harness import TreeSampler  # noqa: E402
from scale_report import merge_runs  # noqa: E402

from curate.text import ngram_overlap  # noqa: E402

N = 3000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    # Three chunks, so chunk boundaries (ids, query positives, row groups) are exercised.
    return ensure_corpus(tmp_path_factory.mktemp("scale"), CorpusSpec(N, chunk=1000))


def _matrix(col: pa.ChunkedArray) -> np.ndarray:
    arr = col.combine_chunks()
    return arr.flatten().to_numpy().reshape(len(arr), arr.type.list_size)


def test_corpus_files_schema_and_row_groups(corpus):
    docs, queries = (
        pq.ParquetFile(corpus / "corpus.parquet"),
        pq.read_table(corpus / "queries.parquet"),
    )
    assert docs.metadata.num_rows == N and docs.metadata.num_row_groups == 3
    assert docs.schema_arrow.names == ["_id", "title", "text", "emb"]
    assert docs.schema_arrow.field("emb").type == pa.list_(pa.float32(), 384)
    assert queries.schema.names == ["_id", "text", "emb"] and queries.num_rows == N // 10
    ids = docs.read(columns=["_id"]).column("_id").to_pylist()
    assert len(set(ids)) == N and ids == sorted(ids)
    lines = (corpus / "qrels" / "train.tsv").read_text().splitlines()
    assert lines[0] == "query-id\tcorpus-id\tscore" and len(lines) == N // 10 + 1
    assert [ln.split("\t")[0] for ln in lines[1:]] == queries.column("_id").to_pylist()
    meta = json.loads((corpus / "meta.json").read_text())
    assert meta["n_queries"] == N // 10 and meta["spec"]["n_docs"] == N


def test_vectors_unit_and_each_query_nearest_its_positive(corpus):
    docs, queries = (
        pq.read_table(corpus / "corpus.parquet"),
        pq.read_table(corpus / "queries.parquet"),
    )
    x, q = _matrix(docs.column("emb")), _matrix(queries.column("emb"))
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    row = {d: i for i, d in enumerate(docs.column("_id").to_pylist())}
    lines = (corpus / "qrels" / "train.tsv").read_text().splitlines()[1:]
    pos = np.array([row[ln.split("\t")[1]] for ln in lines])
    best = (q @ x.T).argmax(axis=1)
    # A positive's near-duplicate (same vector plus noise) can outscore it, rarely.
    assert np.mean(best == pos) > 0.9


def test_topics_give_clusters_and_near_duplicates_share_ngrams(corpus):
    docs = pq.read_table(corpus / "corpus.parquet")
    x, texts = _matrix(docs.column("emb")), docs.column("text").to_pylist()
    titles = docs.column("title").to_pylist()  # a topic's two first words: one title per topic
    same = [i for i in range(1, 400) if titles[i] == titles[0]]
    other = [i for i in range(1, 400) if titles[i] != titles[0]]
    assert same and (x[same] @ x[0] > 0.3).all() and abs(x[other] @ x[0]).mean() < 0.15
    dup = DUP_EVERY - 1
    assert ngram_overlap(texts[dup], texts[dup - 1]) > 0.5 and texts[dup] != texts[dup - 1]
    assert ngram_overlap(texts[5], texts[6]) < 0.5


def test_an_existing_corpus_is_reused_and_a_changed_spec_regenerates(corpus):
    work = corpus.parent
    before = (corpus / "corpus.parquet").stat().st_mtime_ns
    assert ensure_corpus(work, CorpusSpec(N, chunk=1000)) == corpus
    assert (corpus / "corpus.parquet").stat().st_mtime_ns == before
    other = ensure_corpus(work, CorpusSpec(N, chunk=1000, seed=1))
    assert other != corpus and not pq.read_table(other / "corpus.parquet").equals(
        pq.read_table(corpus / "corpus.parquet")
    )


def test_sampler_sees_a_child_process_peak(tmp_path):
    """A child of a child allocates ~300 MB and exits: its high-water mark is kept."""
    code = textwrap.dedent("""
        import subprocess, sys, time
        inner = "import numpy as np, time; a = np.ones(300 * 2**20 // 8); time.sleep(1.5)"
        subprocess.run([sys.executable, "-c", inner], check=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code])
    with TreeSampler({proc.pid: "driver"}, every=0.1) as mem:
        proc.wait(60)
    got = mem.summary()
    assert got["driver_peak_rss_mb"] < 200
    assert max(p["peak_rss_mb"] for p in got["processes"]) > 300


def test_cli_cluster_meters_its_scheduler_and_leaves_no_process(tmp_path):
    """``dask scheduler`` + one ``dask worker`` from the command line run a task, whose bytes
    reach the traffic meter the preload put on the scheduler (where pipelines.traffic exists);
    every process is gone after the block."""
    from distributed import Client

    with cli_cluster(tmp_path, n_workers=1) as cluster:
        pids = [cluster.scheduler.pid, *(w.pid for w in cluster.workers)]
        with Client(cluster.address) as client:
            assert client.submit(sum, [1, 2], key="probe-1").result() == 3
        got = traffic_fields(fetch_traffic(cluster.address))
    if metered():
        assert got["traffic"]["prefixes"]["probe"]["tasks"] == 1 and got["scheduler_bytes"] > 0
    else:
        assert got["scheduler_bytes"] is None
    assert all(not psutil.pid_exists(p) or psutil.Process(p).status() == "zombie" for p in pids)


def test_merge_replaces_the_same_n_and_mode_and_keeps_the_rest(tmp_path):
    path = tmp_path / "res.json"
    merge_runs(path, [{"n_docs": 10, "mode": "local", "v": 1}, {"n_docs": 5, "mode": "cli"}])
    res = merge_runs(path, [{"n_docs": 10, "mode": "local", "v": 2}])
    assert [(r["n_docs"], r["mode"]) for r in res["runs"]] == [(5, "cli"), (10, "local")]
    assert res["runs"][1]["v"] == 2 and json.loads(path.read_text()) == res


def test_benchmark_runs_the_pipeline_and_records_its_figures(tmp_path, capsys):
    out_json, out_png = tmp_path / "scale.json", tmp_path / "scale.png"
    argv = [
        "--sizes",
        str(N),
        "--modes",
        "local",
        "--work",
        str(tmp_path / "work"),
        "--json",
        str(out_json),
        "--plot",
        str(out_png),
        "--timeout",
        "600",
    ]
    assert pipeline_scale.main(argv) == 0
    (run,) = json.loads(out_json.read_text())["runs"]
    assert run["status"] == "ok", run["driver_log_tail"]
    assert (run["n_docs"], run["n_queries"], run["mode"]) == (N, N // 10, "local")
    assert {"read", "index", "mine", "curate"} <= set(run["timings"])
    assert "train" not in run["timings"] and "evaluate" not in run["timings"]
    assert run["wall_s"] >= run["stage_sum_s"] > 0
    assert run["counts"]["rows"] == N // 10 and run["funnel"]["kept"] > 0
    assert run["factory"] == "Flat"
    # Two worker processes besides the driver, each measured.
    assert len(run["workers_peak_rss_mb"]) == 2 and run["driver_peak_rss_mb"] > 50
    assert run["tree_peak_rss_mb"] > run["driver_peak_rss_mb"]
    if metered():  # the scheduler's meter (pipelines.traffic) is there to read
        assert run["scheduler_bytes"] > 0 and run["traffic"]["prefixes"]
        assert 0 < run["largest_arg_bytes"] <= run["scheduler_bytes"]
        assert run["traffic_note"] is None
    else:
        assert run["scheduler_bytes"] is None and "pipelines.traffic" in run["traffic_note"]
    assert run["machine"]["cores"] >= 1 and isinstance(run["machine"]["avx512_bf16"], bool)
    assert "--sizes 3000" in run["command"]
    assert out_png.stat().st_size > 0 and "| 3,000 | local | ok |" in capsys.readouterr().out
    # --report-only re-plots from the JSON alone.
    out_png.unlink()
    assert pipeline_scale.main([*argv, "--report-only"]) == 0 and out_png.is_file()
