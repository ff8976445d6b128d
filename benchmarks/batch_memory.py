"""The batch stage's memory and time, step by step, on synthetic mined pairs: the driver's
resident set (VmRSS, sampled every millisecond) before, at the peak of and after each step of
``curate.batch.stage.curate``, for N docs and R training rows (one positive per query, 7
negatives and 3 spares each, as ``benchmarks/pipeline_scale.py`` mines them). No index, no
model: the records the mine stage would hand over are built directly, so R = 1M runs in minutes
where the whole pipeline at 1M queries takes hours. The shard writers run in a separate process
(as on a cluster), so their memory is not the driver's.

    .venv/bin/python benchmarks/batch_memory.py --docs 1000000 --rows 100000
    .venv/bin/python benchmarks/batch_memory.py --docs 1000000 --rows 100000 --where pipeline

``--where driver`` (the default) runs ``curate.batch.stage.curate`` in this process and prints
one line per step in call order, in MB, then the stage's wall time. ``--where pipeline`` runs
the pipeline's stage (``pipelines.stages.curate_stage``: topics and composition in worker tasks)
on a LocalCluster of one worker process and prints this process's peak over the stage and the
worker's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from read_memory import Sampler, rss_mb  # noqa: E402


def records(n_docs: int, n_rows: int, out: Path, seed: int = 0):
    """(Read, Embedded, Mined, topic_of) as the stages before the batch stage leave them."""
    from curate import schema
    from curate.batch.dedup import add_text_hash
    from curate.mine.negatives import load_doc_texts, write_doc_ids, write_doc_texts
    from curate.read.dataset import Dataset
    from curate.records import Embedded, Known, Mined, Read

    rng = np.random.default_rng(seed)
    doc_ids = pl.Series("doc_id", [f"d{i}" for i in range(n_docs)], pl.String)
    texts = pl.Series("text", [f"document {i} about topic {i % 997}" for i in range(n_docs)])
    corpus = add_text_hash(pl.DataFrame({"doc_id": doc_ids, "title": "", "text": texts})).select(
        "doc_id", "hash"
    )
    (out / "work").mkdir()
    write_doc_texts(out / "work" / "doc_texts.arrow", texts)  # as the index stage leaves them
    write_doc_ids(out / "work" / "doc_ids.arrow", doc_ids)
    del texts
    q_ids = pl.Series("query_id", [f"q{i}" for i in range(n_rows)], pl.String)
    queries = pl.DataFrame({"query_id": q_ids, "text": [f"query {i}" for i in range(n_rows)]})
    pos = rng.permutation(n_docs)[:n_rows]
    cand = rng.integers(0, n_docs, size=(n_rows, 10))
    pairs = pa.table({
        "query_id": q_ids.to_arrow(),
        "pos_id": doc_ids.gather(pos).to_arrow(),
        "pos_score": pa.array(rng.random(n_rows, dtype=np.float32)),
        "neg_ids": pa.ListArray.from_arrays(np.arange(0, 10 * n_rows + 1, 10),
                                            doc_ids.gather(cand.ravel()).to_arrow()),
        "neg_scores": pa.ListArray.from_arrays(np.arange(0, 10 * n_rows + 1, 10),
                                               pa.array(rng.random(10 * n_rows, np.float32))),
        "neg_ranks": pa.ListArray.from_arrays(np.arange(0, 10 * n_rows + 1, 10),
                                              pa.array(np.tile(np.arange(10, dtype=np.int32),
                                                               n_rows))),
    }).cast(schema.MINED)  # fmt: skip
    qrels = pl.DataFrame({"query_id": q_ids, "doc_id": doc_ids.gather(pos),
                          "score": np.ones(n_rows)})  # fmt: skip
    known = Known(qrels)  # as the read stage keeps them
    dataset = Dataset(corpus, queries, {"train": qrels}, {"docs_read": n_docs})
    read = Read(dataset, corpus, load_doc_texts(str(out / "work" / "doc_texts.arrow")),
                qrels.select("query_id", "doc_id"), known)  # fmt: skip
    emb = Embedded(doc_ids, np.zeros((0, 4), np.float32), q_ids, np.zeros((0, 4), np.float32))
    funnel = {"candidates": 10 * n_rows, "kept": 7 * n_rows, "spare": 3 * n_rows}
    mined = Mined(pairs, schema.FORBIDDEN.empty_table(), funnel, known, None, None, {})
    topic_of = dict(zip(q_ids.to_list(), (rng.integers(0, 316, n_rows)).tolist()))
    return read, emb, mined, topic_of


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=1_000_000)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--where", choices=("driver", "pipeline"), default="driver")
    args = ap.parse_args()
    if args.where == "pipeline":
        return pipeline(args.docs, args.rows)
    from curate.batch import curation, stage
    from curate.config import config_from_dict
    from pipelines.cluster import arrow_system_allocator

    arrow_system_allocator()  # as the CLI does before the first Arrow buffer
    sampler, lines = Sampler(), []
    for name in ("canonical_map", "stage_shards"):
        sampler.step(stage, name, lines)
    for name in ("build_rows", "shard_table", "text_rows", "known_table"):
        sampler.step(curation, name, lines)
        setattr(stage, name, getattr(curation, name))
    spawn = get_context("spawn")  # a forked child of a threaded process can hang
    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(1, mp_context=spawn) as pool:
        out = Path(tmp)
        cfg = config_from_dict({"data": {"path": tmp}, "output_dir": tmp,
                                "batch": {"batch_size": 32}})  # fmt: skip
        read, emb, mined, topic_of = records(args.docs, args.rows, out)
        start = rss_mb()
        t0 = time.perf_counter()
        stage.curate(cfg, out, read, emb, mined, topic_of,
                     tasks=lambda fn, a, label: list(pool.map(fn, *zip(*a))))  # fmt: skip
        wall = time.perf_counter() - t0
    print(f"{args.docs} docs, {args.rows} rows; records built: {start} MB")
    print("\n".join(lines))
    print(f"after the stage: {rss_mb()} MB; wall {wall:.1f} s")


def pipeline(n_docs: int, n_rows: int) -> None:
    """The pipeline's batch stage over the same records, on a LocalCluster of one worker, the
    mined pairs memory-mapped from their file as the mine stage leaves them."""
    from dataclasses import replace

    from curate.config import config_from_dict
    from curate.files import read_arrow, write_arrow
    from pipelines.cluster import arrow_system_allocator, connect
    from pipelines.stages import curate_stage

    arrow_system_allocator()
    sampler = Sampler()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        cfg = config_from_dict({"data": {"path": tmp}, "output_dir": tmp,
                                "batch": {"batch_size": 32},
                                "cluster": {"workers": "processes", "n_workers": 1}})  # fmt: skip
        read, emb, mined, _ = records(n_docs, n_rows, out)
        work = out / "work"  # what the index stage leaves beside the ids and texts
        # The mined pairs as the mine stage leaves them: a file the driver maps, not a table.
        write_arrow(work / "mined-pairs.arrow", mined.pairs)
        mined = replace(mined, pairs=read_arrow(work / "mined-pairs.arrow"),
                        pairs_file=str(work / "mined-pairs.arrow"))
        np.save(work / "doc_hash.npy", read.corpus["hash"].to_numpy().astype(np.uint64))
        np.lib.format.open_memmap(work / "doc_vecs.npy", "w+", np.float32, (n_docs, 1)).flush()
        qv = np.random.default_rng(1).standard_normal((n_rows, 8)).astype(np.float32)
        np.save(work / "query_vecs.npy", qv / np.linalg.norm(qv, axis=1, keepdims=True))
        del qv
        emb = replace(emb, query_vecs=np.load(work / "query_vecs.npy", mmap_mode="r"))
        with connect(cfg.cluster, quiet=True) as workers:
            # Reset twice: a sample taken before the first reset may land after it.
            sampler.peak = 0
            time.sleep(0.05)
            start, sampler.peak = rss_mb(), 0
            t0 = time.perf_counter()
            curate_stage(workers, cfg, out, read, emb, mined, work)
            wall = time.perf_counter() - t0
            time.sleep(0.01)
            peak = sampler.peak
            worker = max(workers.client.run(_peak_mb).values())
    print(f"{n_docs} docs, {n_rows} rows; records built: {start} MB")
    print(f"driver over the stage: peak {peak} MB (+{peak - start}); worker peak {worker} MB; "
          f"wall {wall:.1f} s")


def _peak_mb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    return -1


if __name__ == "__main__":
    main()
