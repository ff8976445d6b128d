"""Stage 4's logic around the distributed search: the training pairs as integer blocks, the
ceiling calibration before mining, and the checks after it (false negatives, teacher scores,
the manifest's quality sections). The search itself runs on the cluster (pipelines.searching)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import polars as pl

from curate import health
from curate.config import Config, MineConfig
from curate.effective import effective_settings
from curate.files import write_json
from curate.mine import ceiling, fncheck
from curate.mine.negatives import PairBlock
from curate.records import Embedded, Indexed, Mined, Read
from curate.text import LazyMap, content_hash


def pair_blocks(pairs: pl.DataFrame, known: dict[str, list[str]], q_row: dict, d_row: dict,
                size: int) -> list[PairBlock]:
    """Training pairs grouped by query into blocks of ``size`` queries, in integer form; the
    query vectors stay in their file (``query_rows``): the mine task reads them."""
    qids = pairs["query_id"].unique(maintain_order=True).to_list()
    blocks = []
    for start in range(0, len(qids), size):
        ids = qids[start : start + size]
        local = {q: i for i, q in enumerate(ids)}
        sub = pairs.filter(pl.col("query_id").is_in(ids))
        blocks.append(
            PairBlock(
                query_ids=ids,
                query_vecs=None,
                pair_query=np.array([local[q] for q in sub["query_id"]], dtype=np.int64),
                pair_pos=np.array([d_row[d] for d in sub["doc_id"]], dtype=np.int64),
                known=[np.array(sorted(d_row[d] for d in known[q]), dtype=np.int64) for q in ids],
                pos_ids=sub["doc_id"].to_list(),
                query_rows=np.array([q_row[q] for q in ids], dtype=np.int64),
            )
        )
    return blocks  # fmt: skip


def blocks(read: Read, emb: Embedded, indexed: Indexed, size: int) -> list[PairBlock]:
    """The run's training pairs as blocks, each reading doc texts for the n-gram rule."""
    out = pair_blocks(read.pairs, read.known, emb.query_row, emb.doc_row, size)
    for b in out:
        b.doc_texts = str(indexed.work / "doc_texts.arrow")
    return out


def calibrate_ceiling(cfg: Config, read: Read, emb: Embedded,
                      indexed: Indexed) -> tuple[MineConfig, ceiling.Calibration | None]:
    """-> (the mine config to use, the calibration or None): ``mine.calibrate_ceiling`` picks
    max_relative from the train queries' known positives before any mining. Kept in the work
    folder, so a rerun over the same embeddings and positives does not search again."""
    if cfg.mine.calibrate_ceiling is None:
        return cfg.mine, None
    d_row, q_row = emb.doc_row, emb.query_row
    queries = read.pairs["query_id"].unique(maintain_order=True).to_list()
    positives = [[d for d in read.known.get(q, []) if d in d_row] for q in queries]
    key = content_hash(
        [
            indexed.fingerprint,
            json.dumps(dataclasses.asdict(cfg.mine), sort_keys=True),
            str(cfg.seed),
            *(f"{q}\t{','.join(ds)}" for q, ds in zip(queries, positives)),
        ]
    )
    path = indexed.work / f"ceiling-{key}.json"
    if path.is_file():
        cal = ceiling.Calibration(**json.loads(path.read_text()))
    else:
        rows = [np.array([d_row[d] for d in ds], dtype=np.int64) for ds in positives]
        cal = ceiling.calibrate(
            emb.doc_vecs,
            emb.query_vecs[[q_row[q] for q in queries]],
            rows,
            cfg.mine,
            cfg.mine.calibrate_ceiling,
            cfg.seed,
        )
        write_json(path, dataclasses.asdict(cal))
    return dataclasses.replace(cfg.mine, max_relative=cal.max_relative), cal  # fmt: skip


def check(cfg: Config, read: Read, emb: Embedded, indexed: Indexed, mined: Mined) -> Mined:
    """False-negative check, mining quality and teacher scores, then the manifest's sections
    on the index, the settings decided at run time and the embeddings."""
    pairs, forbidden, known, checks = fncheck.apply(
        cfg,
        mined.pairs,
        mined.forbidden,
        mined.funnel,
        mined.known,
        LazyMap(lambda: read.query_text),
        LazyMap(lambda: dict(zip(emb.doc_ids, read.texts))),
    )
    checks["index_recall"] = indexed.recall
    checks["effective"] = effective_settings(
        cfg, mined.mine, indexed.index.nprobe, mined.calibration, indexed.recall
    )
    checks["embedding_health"] = mined.checks.get("embedding_health") or \
        health.embedding_health(emb.doc_vecs, cfg.seed)  # computed here when no task did
    if mined.calibration is not None:
        checks["ceiling_calibration"] = dataclasses.asdict(mined.calibration)
    return dataclasses.replace(mined, pairs=pairs, forbidden=forbidden, known=known, checks=checks)
