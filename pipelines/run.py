"""The whole pipeline, top to bottom: read -> embed -> index -> mine -> curate -> train -> evaluate.

Every stage's output lands under ``cfg.output_dir``; partitioned stages are content-addressed so
a rerun (after a crash, or with a changed later stage) repeats only what changed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import polars as pl

from curate import config_rules, health, outdir
from curate.batch import dedup, shards
from curate.batch.curation import (
    build_rows,
    canonical_forbidden,
    funnel_balance,
    query_topics,
    shard_counts,
    shard_funnel,
    shard_table,
)
from curate.config import Config, DataConfig
from curate.embed import encoder as embed
from curate.eval.evaluate import evaluate
from curate.index import build as index
from curate.mine import ceiling, fncheck
from curate.mine import negatives as mine
from curate.read.dataset import Dataset, read_dataset
from curate.text import content_hash
from pipelines.cluster import Workers, arrow_system_allocator, connect
from pipelines.stages import build_index_shards, embed_texts, guard_index, mine_pairs

log = logging.getLogger(__name__)


@contextmanager
def _timed(timings: dict, name: str):
    t0 = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - t0, 3)
    log.info("%s: %.1fs", name, timings[name])


def resolve_data(cfg: Config) -> DataConfig:
    """``data.path: demo`` -> the generated demo set (written once under the output folder)."""
    if cfg.data.path != "demo":
        return cfg.data
    from curate.read.synth import write_demo_dataset

    folder = Path(cfg.output_dir) / "demo-data"
    if not (folder / "corpus.jsonl").is_file():
        write_demo_dataset(folder, seed=cfg.seed)
    return dataclasses.replace(cfg.data, path=str(folder))


def doc_texts(corpus: pl.DataFrame) -> list[str]:
    """Title and text joined as BEIR models expect; the title alone is dropped when the text
    already starts with it (Cranfield repeats it)."""
    return [
        t if not ti or t.startswith(ti) else f"{ti} {t}"
        for ti, t in zip(corpus["title"].to_list(), corpus["text"].to_list())
    ]


def train_pairs(ds: Dataset, cfg: Config) -> pl.DataFrame:
    """Positive (query, doc) pairs of the train split, sorted; optionally the first N queries."""
    pairs = ds.qrels[cfg.data.train_split].filter(pl.col("score") > 0).sort("query_id", "doc_id")
    if cfg.data.max_train_queries:
        keep = pairs["query_id"].unique(maintain_order=True)[: cfg.data.max_train_queries]
        pairs = pairs.filter(pl.col("query_id").is_in(keep.implode()))
    return pairs


def pair_blocks(pairs: pl.DataFrame, known: dict[str, list[str]], q_row: dict, d_row: dict,
                q_vecs: np.ndarray, size: int) -> list[mine.PairBlock]:
    """Training pairs grouped by query into blocks of ``size`` queries, in integer form."""
    qids = pairs["query_id"].unique(maintain_order=True).to_list()
    blocks = []
    for start in range(0, len(qids), size):
        ids = qids[start : start + size]
        local = {q: i for i, q in enumerate(ids)}
        sub = pairs.filter(pl.col("query_id").is_in(ids))
        blocks.append(
            mine.PairBlock(
                query_ids=ids,
                query_vecs=q_vecs[[q_row[q] for q in ids]],
                pair_query=np.array([local[q] for q in sub["query_id"]], dtype=np.int64),
                pair_pos=np.array([d_row[d] for d in sub["doc_id"]], dtype=np.int64),
                known=[np.array(sorted(d_row[d] for d in known[q]), dtype=np.int64) for q in ids],
                pos_ids=sub["doc_id"].to_list(),
            )
        )
    return blocks


# The stages ``run(cfg, stop_after=...)`` can end after (the CLI's stage subcommands).
STAGES = ("embed", "index", "mine", "batch", "train", "eval")


def run(cfg: Config, quiet: bool = False, stop_after: str = "eval") -> dict:
    """Every stage up to and including ``stop_after``; cached stages repeat nothing on a rerun.
    A run that stops early returns what it has (``stopped_after`` set) and writes no report.json."""
    if stop_after not in STAGES:
        raise ValueError(f"stop_after={stop_after!r}; choose one of {STAGES}")
    timings: dict[str, float] = {}
    out = Path(cfg.output_dir)
    outdir.check(out, cfg.overwrite)  # before anything is created: never another program's folder
    embed.check_model(cfg.embed)  # a model that needs remote code fails here, not in a worker
    arrow_system_allocator()  # before the first Arrow buffer

    def done(stage: str) -> bool:
        return STAGES.index(stage) >= STAGES.index(stop_after)

    def partial(stage: str, **got) -> dict:
        return {"output_dir": str(out), "stopped_after": stage, "timings": timings, **got}

    with _timed(timings, "read"):
        ds = read_dataset(resolve_data(cfg))  # validation happens before anything is written
        pairs = train_pairs(ds, cfg)
        config_rules.check_data(cfg, pairs.height)  # before anything is written
        known = {
            q: g["doc_id"].to_list()
            for (q,), g in ds.qrels[cfg.data.train_split].filter(pl.col("score") > 0).group_by("query_id")
        }
        corpus = dedup.add_text_hash(ds.corpus)
        fncheck.resolve_scorers(cfg)  # fncheck/teacher model folders, before any work
    cache = Path(cfg.cache_dir) if cfg.cache_dir else out / "cache"
    model_path = embed.resolve_model(cfg.embed.model)  # a bad model folder fails before any write
    model_fp = embed.model_fingerprint(model_path)
    work = out / "work"
    outdir.claim(out)  # validation passed: mark the folder as curate's
    work.mkdir(parents=True, exist_ok=True)
    texts = doc_texts(corpus)
    with connect(cfg.cluster, quiet, texts=len(corpus) + len(ds.queries)) as workers:
        with _timed(timings, "embed"):
            doc_ids, doc_vecs = embed_texts(
                workers, corpus["doc_id"].to_list(), texts, cfg.embed.doc_prefix, model_path,
                model_fp, cfg.embed, cache / "docs",
            )
            q_ids, q_vecs = embed_texts(
                workers, ds.queries["query_id"].to_list(), ds.queries["text"].to_list(),
                cfg.embed.query_prefix, model_path, model_fp, cfg.embed, cache / "queries",
            )
        if done("embed"):
            return partial("embed")
        with _timed(timings, "index"):
            index_fp = build_index_files(workers, work, corpus, doc_ids, doc_vecs, model_fp, cfg)
            # Before any search: the index must come from the queries' model and dimension.
            index.check_record(work, cfg.embed.model, model_fp, q_vecs.shape[1], len(doc_ids))
        with _timed(timings, "recall_guard"):  # approximate indexes: recall@k vs brute force
            train_q_vecs = q_vecs[np.isin(q_ids, pairs["query_id"].unique().to_list())]
            nprobe, index_recall = guard_index(work, train_q_vecs, cfg.mine.top_k, cfg.index, cfg.seed)
            icfg = dataclasses.replace(cfg.index, nprobe=nprobe)
        if done("index"):
            return partial("index")
        with _timed(timings, "mine"):
            q_row = {q: i for i, q in enumerate(q_ids)}
            d_row = {d: i for i, d in enumerate(doc_ids)}
            blocks = pair_blocks(pairs, known, q_row, d_row, q_vecs, cfg.mine.query_partition)
            for b in blocks:
                b.doc_texts = str(work / "doc_texts.arrow")  # the n-gram rule reads them
            mcfg, cal = calibrate_ceiling(cfg, work, index_fp, pairs, known, q_row, d_row, q_vecs, doc_vecs)
            mined, forbidden, funnel = mine_pairs(workers, blocks, work, index_fp, icfg, mcfg, cfg.seed)
        with _timed(timings, "fncheck"):  # false-negative check, mining quality, teacher scores
            query_text = dict(zip(ds.queries["query_id"].to_list(), ds.queries["text"].to_list()))
            mined, forbidden, known, checks = fncheck.apply(
                cfg, mined, forbidden, funnel, known, query_text, dict(zip(doc_ids, texts))
            )
            checks["index_recall"] = index_recall
            checks["effective"] = effective_settings(cfg, mcfg, nprobe, cal, index_recall)
            checks["embedding_health"] = health.embedding_health(doc_vecs, cfg.seed)
            if cal is not None:
                checks["ceiling_calibration"] = dataclasses.asdict(cal)
        if done("mine"):
            return partial("mine")
        with _timed(timings, "curate"):
            canon, dedup_info = canonical_map(cfg, corpus, doc_ids, doc_vecs, texts)
            manifest = curate_stage(cfg, out, canon, dedup_info, corpus, ds, mined, forbidden, funnel, known, q_row, q_vecs, texts, checks)
        result = {"output_dir": str(out), "shards": str(out / "shards"), "manifest": manifest,
                  "effective": manifest["effective"]}
        if done("batch"):
            return partial("batch", **result)
        if cfg.train.enabled:
            with _timed(timings, "train"):
                result["model"] = str(train_stage(cfg, out, model_path))
        if done("train"):
            return partial("train", **result)
        if cfg.eval.enabled and cfg.data.eval_split:
            with _timed(timings, "evaluate"):
                result["eval"] = evaluate_stage(cfg, ds, cache, workers, model_path, model_fp, texts, result.get("model"))
    result["timings"] = timings
    # docs + queries over the whole embed stage, worker start-up and model loading included
    result["texts_per_s"] = round((len(doc_ids) + len(q_ids)) / max(timings["embed"], 1e-9), 1)
    result.update(health.assess(result, cfg.to_dict(), out))  # warnings, "worse_than_base"
    shards.write_json(out / "report.json", result)
    return result


def calibrate_ceiling(cfg: Config, work: Path, index_fp: str, pairs: pl.DataFrame, known: dict[str, list[str]],
                      q_row: dict, d_row: dict, q_vecs: np.ndarray, doc_vecs: np.ndarray):
    """-> (the mine config to use, the calibration or None): ``mine.calibrate_ceiling`` picks
    max_relative from the train queries' known positives before any mining. Kept in the work
    folder, so a rerun over the same embeddings and positives does not search again."""
    if cfg.mine.calibrate_ceiling is None:
        return cfg.mine, None
    queries = pairs["query_id"].unique(maintain_order=True).to_list()
    positives = [[d for d in known.get(q, []) if d in d_row] for q in queries]
    key = content_hash([index_fp, json.dumps(dataclasses.asdict(cfg.mine), sort_keys=True), str(cfg.seed),
                        *(f"{q}\t{','.join(ds)}" for q, ds in zip(queries, positives))])
    path = work / f"ceiling-{key}.json"
    if path.is_file():
        cal = ceiling.Calibration(**json.loads(path.read_text()))
    else:
        rows = [np.array([d_row[d] for d in ds], dtype=np.int64) for ds in positives]
        cal = ceiling.calibrate(doc_vecs, q_vecs[[q_row[q] for q in queries]], rows, cfg.mine,
                                cfg.mine.calibrate_ceiling, cfg.seed)
        shards.write_json(path, dataclasses.asdict(cal))
    return dataclasses.replace(cfg.mine, max_relative=cal.max_relative), cal


def effective_settings(cfg: Config, mcfg, nprobe: int, cal, index_recall: dict) -> list[dict]:
    """The settings the run decided for itself, each with the configured value, the one used
    and why (``config`` in the manifest keeps what was asked for); [] when none changed."""
    out = []
    if cal is not None and mcfg.max_relative != cfg.mine.max_relative:
        out.append({
            "key": "mine.max_relative", "configured": cfg.mine.max_relative,
            "used": mcfg.max_relative,
            "why": f"mine.calibrate_ceiling={cfg.mine.calibrate_ceiling}: the loosest ceiling whose "
                   f"leave-one-out false-negative rate meets the target ({cal.held_out} known "
                   f"positives of {cal.queries} queries hidden in turn; ceiling_calibration)",
        })  # fmt: skip
    if nprobe != cfg.index.nprobe:
        tries = index_recall.get("attempts", [])
        why = (
            f"recall guard (index.recall_action=raise_nprobe): recall@{index_recall.get('k')} "
            f"{tries[0]['recall']} at nprobe {tries[0]['nprobe']} < index.recall_floor="
            f"{index_recall.get('floor')}; {index_recall.get('recall')} at {nprobe} (index_recall)"
            if len(tries) > 1
            else "HNSW searches with max(efSearch, nprobe) (index_recall)"
        )
        out.append({"key": "index.nprobe", "configured": cfg.index.nprobe, "used": nprobe, "why": why})
    return out


def planned_settings(cfg: Config) -> list[dict]:
    """What ``effective_settings`` may change, as ``curate validate`` can tell before any work:
    -> [{"key", "configured", "decided"}]."""
    out = []
    if cfg.mine.calibrate_ceiling is not None:
        out.append({"key": "mine.max_relative", "configured": cfg.mine.max_relative,
                    "decided": f"calibrated at run time (target {cfg.mine.calibrate_ceiling})"})
    if cfg.index.recall_action == "raise_nprobe" and cfg.index.factory != "Flat":
        out.append({
            "key": "index.nprobe", "configured": cfg.index.nprobe,
            "decided": f"raised at run time while recall@{cfg.mine.top_k} < "
                       f"{cfg.index.recall_floor} (approximate indexes only; index.recall_action)",
        })  # fmt: skip
    return out


def build_index_files(workers: Workers, work: Path, corpus: pl.DataFrame, doc_ids: list[str], doc_vecs: np.ndarray,
                      model_fp: str, cfg: Config) -> str:
    """Index plus the arrays mine tasks memory-map; skipped when the same embeddings are indexed."""
    import pyarrow as pa

    index_fp = content_hash([model_fp, json.dumps(dataclasses.asdict(cfg.index), sort_keys=True), *doc_ids,
                             str(doc_vecs.shape), str(float(doc_vecs.sum()))])
    stamp = work / "index.fingerprint"
    ready = (work / "doc_texts.arrow").is_file() and (work / index.RECORD).is_file()
    if stamp.is_file() and stamp.read_text() == index_fp and ready:
        return index_fp
    mine.write_doc_texts(work / "doc_texts.arrow", doc_texts(corpus))
    np.save(work / "doc_vecs.npy", doc_vecs)
    np.save(work / "doc_hash.npy", np.array([int(h[:16], 16) for h in corpus["hash"]], dtype=np.uint64))
    shards.write_table(work / "doc_ids.parquet", pa.table({"doc_id": doc_ids}))
    build_index_shards(workers, work, cfg.index, cfg.seed)  # one index per contiguous shard
    index.write_record(work, cfg.embed.model, model_fp, doc_vecs.shape[1], len(doc_ids))
    shards.atomic_write_bytes(stamp, index_fp.encode())
    return index_fp


def canonical_map(cfg: Config, corpus, doc_ids, doc_vecs, texts) -> tuple[dict[str, str], dict]:
    """doc_id -> canonical id: exact duplicates first, then (optionally) semantic ones among the
    canonical docs; -> (map, counts and examples for the manifest)."""
    canon_df = dedup.canonical_ids(corpus)
    canon = dict(zip(canon_df["doc_id"].to_list(), canon_df["canonical_id"].to_list()))
    info = {"exact_duplicates": sum(d != c for d, c in canon.items())}
    if cfg.dedup.semantic_threshold is not None:
        keep = [i for i, d in enumerate(doc_ids) if canon[d] == d]
        merged = dedup.semantic_duplicates(
            [doc_ids[i] for i in keep], doc_vecs[keep], cfg.dedup.semantic_threshold,
            cfg.dedup.clusters, cfg.seed,
        )
        sem = {d: c for d, c, _ in merged}
        canon = {d: sem.get(c, c) for d, c in canon.items()}
        text = dict(zip(doc_ids, texts))
        info["semantic_duplicates"] = len(merged)
        info["semantic_examples"] = [
            {"doc_id": d, "canonical_id": c, "cosine": s, "doc": text[d][:200], "canonical": text[c][:200]}
            for d, c, s in merged[:10]
        ]
    return canon, info


def curate_stage(cfg, out, canon, dedup_info, corpus, ds, mined, forbidden, funnel, known, q_row, q_vecs, texts,
                 extra: dict | None = None) -> dict:
    mined_df = pl.from_arrow(mined)
    train_q = mined_df["query_id"].unique(maintain_order=True).to_list()
    topic_of = query_topics(train_q, q_vecs[[q_row[q] for q in train_q]], cfg.batch, cfg.seed)
    # Under canonical ids, as the shards: the mask then catches a rejected doc's twin too.
    forbidden = canonical_forbidden(forbidden, canon)
    rejected: dict[str, set[str]] = {}
    for q, d in zip(forbidden.column("query_id").to_pylist(), forbidden.column("doc_id").to_pylist()):
        rejected.setdefault(q, set()).add(d)
    rows_df, rows, stats = build_rows(mined_df, known, canon, topic_of, rejected)
    doc_text = dict(zip(corpus["doc_id"].to_list(), texts))
    query_text = dict(zip(ds.queries["query_id"].to_list(), ds.queries["text"].to_list()))
    table, batch_stats, fate = shard_table(
        rows_df, rows, cfg.batch, cfg.seed, doc_text, query_text, cfg.mine.num_negatives
    )
    shard_dir = out / "shards"
    files = shards.write_shards(table, shard_dir, cfg.batch.batches_per_shard)
    # Beside the shard folder, not in it: the folder must load as one table (datasets, polars).
    forbidden_path = out / "forbidden.parquet"
    shards.write_table(forbidden_path, forbidden)
    # Every count from what was written: the funnel runs on to the negatives in the shards.
    shard_funnel_ = shard_funnel(funnel, stats["neg_dropped_as_duplicate"], fate)
    if funnel_balance(shard_funnel_):
        log.warning("funnel off by %d candidates: %s", funnel_balance(shard_funnel_), shard_funnel_)
    manifest = {
        "format": "curate-shards/1",
        "seed": cfg.seed,
        "config": cfg.to_dict(),
        "counts": {
            "docs": corpus.height,
            "duplicate_docs": sum(d != c for d, c in canon.items()),
            "queries": ds.queries.height,
            "train_pairs": mined_df.height,
            "rows": table.num_rows,
            "topics": len(set(topic_of.values())),
            "forbidden_pairs": forbidden.num_rows,
            **ds.stats,
            **stats,
            **batch_stats,
            **shard_counts(table, cfg.mine.num_negatives),
        },
        "funnel": shard_funnel_,
        "mining_funnel": dict(sorted(funnel.items())),  # as mined, before stage 5
        "dedup": dedup_info,
        "files": files,
        "forbidden": {"path": "../forbidden.parquet", "sha256": shards.sha256(forbidden_path)},
        "effective": [],  # settings decided at run time (effective_settings), from ``extra``
        **(extra or {}),  # fncheck, score_source, mining_quality, index_recall, effective
    }
    manifest["warnings"] = health.data_warnings(manifest)  # few negatives, collapsed embeddings
    shards.write_manifest(shard_dir, manifest)  # last: marks the shards complete
    return {k: manifest[k] for k in ("counts", "funnel", "warnings", "effective", *(extra or {}))}


def train_stage(cfg: Config, out: Path, model_path: Path) -> Path:
    from train.train import train

    return train(out / "shards", out / "model", model_path, cfg.train, cfg.embed, cfg.seed)


def evaluate_stage(cfg, ds, cache: Path, workers: Workers, base_path, base_fp, texts, trained) -> dict:
    """Base model and trained model side by side on the held-out split."""
    qrels = ds.qrels[cfg.data.eval_split]
    qids = sorted(qrels["query_id"].unique().to_list())[: cfg.eval.max_queries]
    qrels = qrels.filter(pl.col("query_id").is_in(qids))
    qtext = dict(zip(ds.queries["query_id"].to_list(), ds.queries["text"].to_list()))
    doc_ids = ds.corpus["doc_id"].to_list()
    results = {}
    for name, path in [("base", base_path), ("trained", trained)]:
        if path is None:
            continue
        fp = base_fp if name == "base" else embed.model_fingerprint(Path(path))
        _, dv = embed_texts(workers, doc_ids, texts, cfg.embed.doc_prefix, Path(path), fp, cfg.embed, cache / "docs")
        _, qv = embed_texts(workers, qids, [qtext[q] for q in qids], cfg.embed.query_prefix, Path(path), fp, cfg.embed, cache / "queries")
        results[name] = evaluate(qids, qv, doc_ids, dv, qrels)
        log.info("%s: %s", name, results[name])
    return results
