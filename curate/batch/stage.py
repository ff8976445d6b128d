"""Stage 5 as one call: mined pairs -> canonical ids, topics, batches, shards, forbidden pairs
and the manifest (written last: it marks the shards complete)."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from curate import health
from curate.batch import dedup, shards
from curate.batch.curation import (
    TextColumn,
    build_rows,
    canonical_forbidden,
    fill_shard,
    funnel_balance,
    known_table,
    query_topics,
    shard_counts,
    shard_funnel,
    shard_table,
    text_rows,
    with_row_texts,
)
from curate.config import Config
from curate.files import sha256, write_arrow, write_table
from curate.mine.negatives import text_array
from curate.records import Curated, Embedded, Mined, Read

log = logging.getLogger(__name__)

FORMAT = "curate-shards/1"
FORBIDDEN_FILE = "forbidden.parquet"  # beside shards/, not in it: the folder loads as one table
# (function, argument tuples, label) -> their results, in order: the shard tasks' runner
Tasks = Callable[[Callable, list[tuple], str], list]


def canonical_map(cfg: Config, read: Read, emb: Embedded) -> tuple[dict[str, str], dict]:
    """doc_id -> canonical id: exact duplicates first, then (optionally) semantic ones among the
    canonical docs; -> (map, counts and examples for the manifest)."""
    # Only the duplicates: every reader looks ids up with canon.get(d, d), and a map of every
    # doc to itself would be the largest object of the stage (10M entries at MS MARCO scale).
    # The docs whose hash repeats first: every doc's canonical id, sorted, is N rows of strings.
    shared = read.corpus[dedup.repeated_rows(read.corpus["hash"].to_numpy())]
    dups = dedup.canonical_ids(shared).filter(pl.col("doc_id") != pl.col("canonical_id"))
    canon = dict(zip(dups["doc_id"].to_list(), dups["canonical_id"].to_list()))
    info = {"exact_duplicates": len(canon)}
    if cfg.dedup.semantic_threshold is not None:
        doc_ids = emb.doc_ids
        keep = np.flatnonzero(~doc_ids.is_in(list(canon)).to_numpy())
        merged = dedup.semantic_duplicates(
            doc_ids.gather(keep).to_list(), emb.doc_vecs[keep], cfg.dedup.semantic_threshold,
            cfg.dedup.clusters, cfg.seed,
        )
        sem = {d: c for d, c, _ in merged}  # canonical docs merged into another
        canon = {**{d: sem.get(c, c) for d, c in canon.items()}, **sem}
        shown = [x for d, c, _ in merged[:10] for x in (d, c)]  # the examples' texts only
        text = dict(zip(shown, TextColumn(read.corpus["doc_id"], read.texts).take(shown)
                        .to_pylist()))  # fmt: skip
        info["semantic_duplicates"] = len(merged)
        info["semantic_examples"] = [
            {"doc_id": d, "canonical_id": c, "cosine": s, "doc": text[d][:200],
             "canonical": text[c][:200]}
            for d, c, s in merged[:10]
        ]  # fmt: skip
    return canon, info


def train_queries(mined: Mined) -> list[str]:
    """The queries of the mined pairs, in their order: the rows topics are computed for."""
    return pl.from_arrow(mined.pairs.select(["query_id"]))["query_id"].unique(
        maintain_order=True).to_list()  # fmt: skip


@dataclass
class Composed:
    """What composition leaves for the shard writers and the manifest: the rows of every batch
    (SHARD schema without texts, sorted by batch_id), the forbidden pairs under canonical ids,
    the known positives of the training queries, and the stage's counts."""

    table: pa.Table
    forbidden: pa.Table
    known: pl.DataFrame
    counts: dict  # the manifest's stage-5 counts, in its order
    dropped_as_duplicate: int  # the funnel's share of stage 5 (shard_funnel)
    fate: dict
    dedup: dict  # the manifest's dedup section

    def summary(self) -> dict:
        """What ``finish`` reads of it, as JSON (a task hands it over in its plan)."""
        return {"counts": self.counts, "dropped_as_duplicate": self.dropped_as_duplicate,
                "fate": dict(self.fate), "dedup": self.dedup}  # fmt: skip


def compose(cfg: Config, read: Read, emb: Embedded, mined: Mined,
            topic_of: dict[str, int] | None = None) -> Composed:
    """Canonical ids, topics, rows and batches. ``topic_of``: each training query's topic
    when computed elsewhere (a worker task), else here from the query vectors."""
    if not emb.doc_ids.equals(read.corpus["doc_id"]):  # the shards take texts by doc number
        raise ValueError("the embeddings' doc ids are not the corpus's, in its order: embed the "
                         "read stage's corpus (pipelines.stages.embed_stage)")
    canon, dedup_info = canonical_map(cfg, read, emb)
    if topic_of is None:
        train_q = train_queries(mined)
        topic_of = query_topics(train_q, emb.query_vecs[emb.query_rows(train_q)], cfg.batch,
                                cfg.seed)  # fmt: skip
    # Under canonical ids, as the shards: the mask then catches a rejected doc's twin too.
    forbidden = canonical_forbidden(mined.forbidden, canon)
    # Once, for the composer's rows and the shards' known_pos_ids (~0.3 GB at 1M queries).
    known = known_table(mined.known, canon, pl.from_arrow(mined.pairs.column("query_id")))
    rows_df, rows, stats = build_rows(mined.pairs, known, canon, topic_of, emb.doc_index,
                                      forbidden)
    table, batch_stats, fate = shard_table(rows_df, rows, cfg.batch, cfg.seed,
                                           cfg.mine.num_negatives)
    del rows_df, rows
    counts = {
        "duplicate_docs": sum(d != c for d, c in canon.items()),
        "rows": table.num_rows,
        "topics": len(set(topic_of.values())),
        "forbidden_pairs": forbidden.num_rows,
        **stats,
        **batch_stats,
        **shard_counts(table, cfg.mine.num_negatives),
    }
    return Composed(table, forbidden, known, counts, stats["neg_dropped_as_duplicate"], fate,
                    dedup_info)


def curate(cfg: Config, out: Path, read: Read, emb: Embedded, mined: Mined,
           topic_of: dict[str, int] | None = None, tasks: Tasks | None = None) -> Curated:
    """Shards, forbidden pairs and manifest under ``out``; every count from what was written.
    ``topic_of``: as ``compose``'s. ``tasks``: runs the shard writers on the cluster (they read
    the doc texts from the index's files there), else they run here. The pipeline composes in
    a worker task instead (pipelines.stages.curate_stage) and ends with ``finish``."""
    comp = compose(cfg, read, emb, mined, topic_of)
    shard_dir = out / "shards"
    if tasks is None:
        query_text = TextColumn(read.dataset.queries["query_id"], read.dataset.queries["text"])
        ids, texts = emb.doc_ids.to_arrow(), text_array(read.texts)
        files = shards.write_shards(
            comp.table, shard_dir, cfg.batch.batches_per_shard,
            fill=lambda part: with_row_texts(text_rows(part, query_text), texts, ids, comp.known))
        write_table(out / FORBIDDEN_FILE, comp.forbidden)
    else:
        staging = out / "work" / "shards-staging"
        jobs = stage_shards(comp, staging, read.dataset.queries, cfg.batch.batches_per_shard)
        files = write_staged(cfg, out, staging, jobs, tasks)
    return finish(cfg, out, read, mined, comp.summary(), files)


def stage_shards(comp: Composed, folder: Path, queries: pl.DataFrame,
                 batches_per_shard: int) -> list[shards.ShardJob]:
    """``comp``'s shard rows (with their query texts), known positives and forbidden pairs as
    files in ``folder`` (emptied first: a crashed run's files), for ``write_staged``;
    -> the shard jobs."""
    query_text = TextColumn(queries["query_id"], queries["text"])
    Staged.write_new(folder, text_rows(comp.table, query_text), comp.known)
    write_table(folder / FORBIDDEN_FILE, comp.forbidden)
    return shards.shard_jobs(comp.table.column("batch_id").to_numpy(), batches_per_shard)


def write_staged(cfg: Config, out: Path, folder: Path, jobs: list[shards.ShardJob],
                 tasks: Tasks) -> list[dict]:
    """The shards of ``stage_shards``'s folder written by tasks and renamed into ``out/shards``,
    then its forbidden pairs into ``out``; the folder removed. -> the shards' file records."""
    staged = Staged(folder)
    files = shards.write_shards(None, out / "shards", cfg.batch.batches_per_shard,
                                write_many=lambda js: staged.write(js, tasks), jobs=jobs)
    os.replace(folder / FORBIDDEN_FILE, out / FORBIDDEN_FILE)
    shutil.rmtree(folder)
    return files


def finish(cfg: Config, out: Path, read: Read, mined: Mined, composed: dict,
           files: list[dict]) -> Curated:
    """The manifest, once the shards and forbidden pairs are written: ``composed`` is a
    ``Composed``'s counts, dropped_as_duplicate, fate and dedup (as JSON from a task)."""
    # The funnel runs on to the negatives in the shards.
    funnel = shard_funnel(mined.funnel, composed["dropped_as_duplicate"], composed["fate"])
    if funnel_balance(funnel):
        log.warning("funnel off by %d candidates: %s", funnel_balance(funnel), funnel)
    c = composed["counts"]
    counts = {
        "docs": read.corpus.height,
        "duplicate_docs": c["duplicate_docs"],
        "queries": read.dataset.queries.height,
        "train_pairs": mined.pairs.num_rows,
        **{k: c[k] for k in ("rows", "topics", "forbidden_pairs")},
        **read.dataset.stats,
        **{k: v for k, v in c.items() if k not in ("duplicate_docs", "rows", "topics",
                                                    "forbidden_pairs")},
    }  # fmt: skip
    manifest = _manifest(cfg, out, counts, funnel, mined, composed["dedup"], files)
    shards.write_manifest(out / "shards", manifest)  # last: marks the shards complete
    keys = ("counts", "funnel", "warnings", "effective", *mined.checks)
    return Curated(out / "shards", {k: manifest[k] for k in keys})


class Staged:
    """The shard rows (with their texts' row numbers) and the known positives as files in
    ``folder``, for shard tasks to read (``write_new`` writes them)."""

    def __init__(self, folder: Path):
        self.folder, self.rows, self.known = folder, folder / "rows.arrow", folder / "known.parquet"
        self.texts = self.folder.parent / "doc_texts.arrow"  # the index stage's
        self.ids = self.folder.parent / "doc_ids.arrow"

    @classmethod
    def write_new(cls, folder: Path, rows: pa.Table, known: pl.DataFrame) -> Staged:
        """The folder emptied first (a crashed run's files), then the rows and positives."""
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        staged = cls(folder)
        write_arrow(staged.rows, rows)
        known.write_parquet(staged.known)
        return staged

    def write(self, jobs: list[shards.ShardJob], tasks: Tasks) -> list[Path]:
        args = [(str(self.rows), j.start, j.bounds, str(self.folder / j.name), str(self.texts),
                 str(self.ids), str(self.known)) for j in jobs]  # fmt: skip
        return [Path(p) for p in tasks(fill_shard, args, "shards")]


def _manifest(
    cfg: Config, out: Path, counts: dict, funnel: dict, mined: Mined, dedup_info: dict, files: list
) -> dict:
    manifest = {
        "format": FORMAT,
        "seed": cfg.seed,
        "config": cfg.to_dict(),
        "counts": counts,
        "funnel": funnel,
        "mining_funnel": dict(sorted(mined.funnel.items())),  # as mined, before stage 5
        "dedup": dedup_info,
        "files": files,
        "forbidden": {"path": f"../{FORBIDDEN_FILE}", "sha256": sha256(out / FORBIDDEN_FILE)},
        "effective": [],  # settings decided at run time (effective_settings), from the checks
        **mined.checks,  # fncheck, score_source, mining_quality, index_recall, effective
    }
    manifest["warnings"] = health.data_warnings(manifest)  # few negatives, collapsed embeddings
    return manifest
