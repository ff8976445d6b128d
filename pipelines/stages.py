"""The stages on the cluster: records in, a record out (pipelines.run wires them). The task
mappings are in pipelines/embedding.py (embed) and pipelines/searching.py (index, guard,
mine); the stages here add the small tasks that read every vector (recall guard, topics)."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from curate.config import Config, EmbedConfig, IndexConfig
from curate.embed import encoder as embed
from curate.errors import DataError
from curate.files import NpyRows, npy_file, read_arrow, write_arrow, write_table
from curate.index import build as index
from curate.index import stage as index_files
from curate.mine import stage as mine_logic
from curate.records import Curated, Embedded, Indexed, Known, Mined, Model, Read
from curate.text import content_hash
from pipelines.cluster import Workers
from pipelines.embedding import embed_texts, given_vectors
from pipelines.searching import build_index_shards, guard_index, mine_pairs, release_indexes

log = logging.getLogger(__name__)


def vectors_stage(workers: Workers, read: Read, cfg: Config, cache: Path) -> Embedded:
    """The embed stage when the inputs carry their vectors: docs then queries, checked to share
    a dimension."""
    from curate.read.vectors import parquet_inputs

    cols, data = cfg.data.columns, parquet_inputs(cfg.data)
    doc_ids, q_ids = read.corpus["doc_id"], read.dataset.queries["query_id"]
    rows = max(cfg.embed.partition_size, 100_000)  # reading is cheap: fewer, larger tasks
    opts = dict(cfg.storage.options)
    docs = given_vectors(workers, data.corpus, cols.doc_id, cols.vector, doc_ids, cache / "given",
                         rows, opts)  # fmt: skip
    queries = given_vectors(workers, data.queries, cols.query_id, cols.vector, q_ids,
                            cache / "given", rows, opts)  # fmt: skip
    if docs.shape[1] != queries.shape[1]:
        raise DataError(data.queries, f"query vectors have {queries.shape[1]} dimensions, the "
                        f"corpus's {docs.shape[1]}", "embed both with the same model")
    return Embedded(doc_ids, docs, q_ids, queries)


def embed_stage(
    workers: Workers, read: Read, model: Model, ecfg: EmbedConfig, cache: Path
) -> Embedded:
    """Docs then queries, each cached per partition under ``cache``."""
    q = read.dataset.queries
    doc_ids, doc_vecs = embed_texts(
        workers,
        read.corpus["doc_id"].to_list(),
        read.texts,
        ecfg.doc_prefix,
        model.path,
        model.fingerprint,
        ecfg,
        cache / "docs",
    )
    q_ids, q_vecs = embed_texts(
        workers,
        q["query_id"].to_list(),
        q["text"].to_list(),
        ecfg.query_prefix,
        model.path,
        model.fingerprint,
        ecfg,
        cache / "queries",
    )
    return Embedded(doc_ids, doc_vecs, q_ids, q_vecs)  # fmt: skip


def index_stage(
    workers: Workers, work: Path, cfg: Config, read: Read, model: Model, emb: Embedded
) -> str:
    """Index plus the arrays mine tasks memory-map, skipped when the same embeddings are
    indexed; checked against the queries' model and dimension before any search. -> its
    fingerprint."""
    fp = index_files.fingerprint(cfg, model, emb)
    if not index_files.is_built(work, fp):
        index_files.write_inputs(work, read, emb)
        build_index_shards(workers, work, cfg.index, cfg.seed)  # one per contiguous shard
        index_files.mark_built(work, fp, cfg, model, emb)
    index.check_record(work, cfg.embed.model, model.fingerprint, emb.query_vecs.shape[1],
                       len(emb.doc_ids))  # fmt: skip
    return fp


def guard_stage(workers: Workers, work: Path, fp: str, cfg: Config, read: Read,
                emb: Embedded) -> Indexed:
    """Approximate indexes: recall@k of a sample of the train queries against brute force
    (nprobe raised or the run stopped below the floor), in a task: the brute force reads every
    doc vector, and the sample's rows are read there too (a row read through a memory map
    maps far more than the row: 370 MB for 1,000 rows at 1M docs)."""
    from curate.index.recall import sample_rows

    train_q = read.pairs["query_id"].unique().to_list()
    rows = np.flatnonzero(emb.query_ids.is_in(train_q).to_numpy())
    rows = rows[sample_rows(len(rows), cfg.index.recall_sample, cfg.seed)]  # the guard's sample
    src, sample = _vectors_file(emb.query_vecs, work, "guard"), work / "guard-rows.npy"
    np.save(sample, rows)
    nprobe, recall = workers.client.submit(
        _guard_task, str(work), src, str(sample), cfg.mine.top_k, cfg.index, cfg.seed,
        workers.torch_threads, key=f"guard-{fp}", pure=False,
    ).result()  # fmt: skip
    sample.unlink()
    (work / "guard-source.npy").unlink(missing_ok=True)
    return Indexed(work, fp, replace(cfg.index, nprobe=nprobe), recall)


def _vectors_file(vecs: np.ndarray, work: Path, name: str) -> str:
    """The ``.npy`` a task reads ``vecs`` from: the file they map, or (vectors handed in memory,
    the Python API) ``<name>-source.npy`` written here."""
    if (src := npy_file(vecs)) is not None:
        return src
    np.save(work / f"{name}-source.npy", np.asarray(vecs, np.float32))
    return str(work / f"{name}-source.npy")


def _guard_task(work: str, queries: str, rows: str, k: int, icfg: IndexConfig, seed: int,
                threads: int):
    import faiss

    faiss.omp_set_num_threads(threads)
    sample = np.asarray(np.load(queries, mmap_mode="r")[np.load(rows)], np.float32)
    return guard_index(Path(work), sample, k, icfg, seed)


def _health_task(vecs: str, seed: int) -> dict:
    from curate.health import embedding_health

    return embedding_health(NpyRows(vecs), seed)  # random rows: read, not mapped


def mine_stage(workers: Workers, cfg: Config, read: Read, emb: Embedded, indexed: Indexed) -> Mined:
    """The ceiling calibrated (when asked), then every block mined on the cluster."""
    blocks = mine_logic.blocks(read, emb, indexed, cfg.mine.query_partition)
    mcfg, cal = mine_logic.calibrate_ceiling(cfg, read, emb, indexed)
    pairs, forbidden, funnel = mine_pairs(workers, blocks, emb.query_vecs, indexed.work,
                                          indexed.fingerprint, indexed.index, mcfg, cfg.seed)
    del blocks
    # The embeddings' health (mean cosine of random doc pairs) from the index's copy, in a task.
    health = workers.client.submit(_health_task, str(indexed.work / "doc_vecs.npy"), cfg.seed,
                                   key=f"health-{indexed.fingerprint}", pure=False).result()
    return Mined(read_arrow(pairs), forbidden, funnel, read.known, mcfg, cal,
                 {"embedding_health": health}, pairs_file=str(pairs))  # mapped, not read


def curate_stage(workers: Workers, cfg: Config, out: Path, read: Read, emb: Embedded,
                 mined: Mined, work: Path) -> Curated:
    """Stage 5 with the driver out of the data: topics and composition (rows, batches, canonical
    ids: ~2 GB at 10M docs x 1M rows) run in worker tasks that read the mined pairs and the
    index's id, hash and text files; the driver writes the inputs, runs the shard tasks from
    the composer's plan (paths and row bounds) and writes the manifest."""
    from curate.batch import stage as batch

    # Mining is over: the workers' index copies can go (a worker lost meanwhile has none).
    workers.client.run(release_indexes, on_error="ignore")
    inputs = work / "batch-inputs"
    shutil.rmtree(inputs, ignore_errors=True)  # a crashed run's files
    inputs.mkdir(parents=True)
    pairs = mined.pairs_file  # the mine stage's file, unless the checks rewrote the pairs
    if pairs is None:
        pairs = str(inputs / "pairs.arrow")
        write_arrow(Path(pairs), mined.pairs)
    write_table(inputs / "forbidden.parquet", mined.forbidden)
    Known.of(mined.known).pairs.write_parquet(inputs / "known.parquet")
    write_arrow(inputs / "queries.arrow", read.dataset.queries.select("query_id", "text")
                .to_arrow())  # fmt: skip
    _topics(workers, cfg, emb, mined, work, inputs / "topics.npy")
    staging = work / "shards-staging"
    plan = workers.client.submit(
        _compose_task, cfg, str(work), str(inputs), pairs, str(staging),
        key=f"compose-{content_hash([str(work), json.dumps(cfg.to_dict(), sort_keys=True)])}",
        pure=False,
    ).result()  # fmt: skip
    plan = json.loads(Path(plan).read_text())
    jobs = [batch.shards.ShardJob(n, start, tuple(bounds)) for n, start, bounds in plan["jobs"]]
    files = batch.write_staged(cfg, out, staging, jobs, shard_tasks(workers))
    shutil.rmtree(inputs)
    return batch.finish(cfg, out, read, mined, plan["composed"], files)


def _compose_task(cfg: Config, work: str, inputs: str, pairs: str, staging: str) -> str:
    """A worker task: the batch stage's composition over the files ``curate_stage`` wrote and the
    index stage's (ids, text hashes, texts, vectors) -> the staged shard rows, forbidden pairs
    and known positives in ``staging``, and the plan (shard jobs, counts) as a JSON path."""
    from curate.batch import stage as batch
    from curate.files import write_json
    from curate.mine.negatives import load_doc_ids, load_doc_texts
    from curate.read.dataset import Dataset

    work_dir, inp, stage_dir = Path(work), Path(inputs), Path(staging)
    doc_ids = pl.from_arrow(load_doc_ids(str(work_dir / "doc_ids.arrow")))
    corpus = pl.DataFrame({"doc_id": doc_ids,
                           "hash": pl.Series(np.load(work_dir / "doc_hash.npy"), dtype=pl.UInt64)})
    queries = pl.from_arrow(read_arrow(inp / "queries.arrow"))
    known = Known(pl.read_parquet(inp / "known.parquet"))
    read = Read(Dataset(corpus, queries, {}, {}), corpus,
                load_doc_texts(str(work_dir / "doc_texts.arrow")), pl.DataFrame(), known)
    doc_vecs = np.load(work_dir / "doc_vecs.npy", mmap_mode="r")
    emb = Embedded(doc_ids, doc_vecs, pl.Series([], dtype=pl.String),
                   np.empty((0, doc_vecs.shape[1]), np.float32))
    forbidden = pq.read_table(inp / "forbidden.parquet")
    mined = Mined(read_arrow(pairs), forbidden, {}, known, cfg.mine, None, {})
    labels = np.load(inp / "topics.npy").tolist()
    topic_of = dict(zip(batch.train_queries(mined), labels, strict=True))
    comp = batch.compose(cfg, read, emb, mined, topic_of)
    jobs = batch.stage_shards(comp, stage_dir, queries, cfg.batch.batches_per_shard)
    plan = {"jobs": [[j.name, j.start, list(j.bounds)] for j in jobs],
            "composed": comp.summary()}
    write_json(stage_dir / "plan.json", plan)
    return str(stage_dir / "plan.json")


def _topics(workers: Workers, cfg: Config, emb: Embedded, mined: Mined, work: Path,
            out: Path) -> str:
    """The training queries' topic labels, in their order, computed by a task into ``out``."""
    from curate.batch.stage import train_queries

    train_q = train_queries(mined)
    rows = emb.query_rows(train_q)
    src = _vectors_file(emb.query_vecs, work, "topic")
    np.save(work / "topic-rows.npy", rows)
    labels = workers.client.submit(
        _topics_task, src, str(work / "topic-rows.npy"), cfg.batch, cfg.seed,
        str(out), workers.torch_threads, key=f"topics-{content_hash(train_q)}",
        pure=False,
    ).result()  # fmt: skip
    for name in ("topic-rows.npy", "topic-source.npy"):
        (work / name).unlink(missing_ok=True)
    return labels


def _topics_task(src: str, rows: str, bcfg, seed: int, out: str, threads: int) -> str:
    import faiss

    from curate.batch.curation import topic_labels

    faiss.omp_set_num_threads(threads)
    vecs = np.asarray(np.load(src, mmap_mode="r")[np.load(rows)], np.float32)
    np.save(out, topic_labels(vecs, bcfg, seed))
    return out


def shard_tasks(workers: Workers):
    """The batch stage's runner of shard tasks: one task per shard, results in order."""
    from pipelines.cluster import gather

    def run(fn, args: list[tuple], label: str) -> list:
        futures = [workers.client.submit(fn, *a, key=f"{label}-{content_hash(map(str, a))}",
                                         pure=False) for a in args]  # fmt: skip
        return gather(workers, futures, label)

    return run


def train_stage(cfg: Config, out: Path, model: Model) -> Path:
    from train.train import train

    return train(out / "shards", out / "model", model.path, cfg.train, cfg.embed, cfg.seed)


def evaluate_stage(
    workers: Workers, cfg: Config, read: Read, cache: Path, model: Model, trained: str | None
) -> dict:
    """Base model and trained model side by side on the held-out split."""
    from curate.eval.evaluate import evaluate

    qrels = read.dataset.qrels[cfg.data.eval_split]
    qids = sorted(qrels["query_id"].unique().to_list())[: cfg.eval.max_queries]
    qrels = qrels.filter(pl.col("query_id").is_in(qids))
    qtext = read.query_text
    doc_ids = read.dataset.corpus["doc_id"].to_list()
    e, results = cfg.embed, {}
    for name, path in [("base", model.path), ("trained", trained)]:
        if path is None:
            continue
        path = Path(path)
        fp = model.fingerprint if name == "base" else embed.model_fingerprint(path)
        _, dv = embed_texts(workers, doc_ids, read.texts, e.doc_prefix, path, fp, e, cache / "docs")
        _, qv = embed_texts(workers, qids, [qtext[q] for q in qids], e.query_prefix, path, fp, e,
                            cache / "queries")  # fmt: skip
        results[name] = evaluate(qids, qv, doc_ids, dv, qrels)
        log.info("%s: %s", name, results[name])
    return results
