"""Stage 4's logic around the distributed search: the training pairs as integer blocks, the
ceiling calibration before mining, and the checks after it (false negatives, teacher scores,
the manifest's quality sections). The search itself runs on the cluster (pipelines.searching)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import polars as pl

from curate import health
from curate.config import Config, MineConfig
from curate.effective import effective_settings
from curate.files import write_json
from curate.mine import ceiling, fncheck
from curate.mine.negatives import PairBlock, Ragged
from curate.records import Embedded, Indexed, Known, Mined, Read, rows_of
from curate.text import LazyMap, content_hash


def pair_blocks(pairs: pl.DataFrame, known: Mapping[str, list[str]], emb: Embedded,
                size: int) -> list[PairBlock]:
    """Training pairs grouped by query into blocks of ``size`` queries, in integer form; the
    query vectors stay in their file (``query_rows``): the mine task reads them. Rows come from
    the embed record's id lookups (``IdRows``), not from dicts of every doc id."""
    qids = pairs["query_id"].unique(maintain_order=True)
    q_rows = emb.query_rows(qids)
    qi = rows_of(qids, pairs["query_id"])  # each pair's query, by first appearance
    pos = emb.doc_rows(pairs["doc_id"])
    # Stable by block: a block's pairs keep their order in ``pairs``.
    order = np.argsort(qi // size, kind="stable")
    ends = np.searchsorted(qi[order] // size, np.arange(1, -(-len(qids) // size) + 1))
    pos_ids = pairs["doc_id"]
    # Every query's known positives as rows in one lookup, not one per block: those in the
    # corpus, sorted within their query, one flat array cut at the queries.
    counts, flat = Known.of(known).flat(qids)
    rows = emb.doc_rows(flat)
    owner = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    keep = rows >= 0
    rows, owner = rows[keep], owner[keep]
    by = np.lexsort((rows, owner))
    rows, owner = rows[by], owner[by]
    starts = np.searchsorted(owner, np.arange(len(qids) + 1))
    blocks, start_pair = [], 0
    for b, stop_pair in enumerate(ends.tolist()):
        q0, q1 = b * size, min((b + 1) * size, len(qids))
        take = order[start_pair:stop_pair]
        start_pair = stop_pair
        blocks.append(
            PairBlock(
                query_ids=qids.slice(q0, q1 - q0),
                query_vecs=None,
                pair_query=qi[take] - q0,
                pair_pos=pos[take],
                known=Ragged(rows[starts[q0] : starts[q1]], starts[q0 : q1 + 1] - starts[q0]),
                pos_ids=pos_ids.gather(take),
                query_rows=q_rows[q0:q1],
            )
        )
    return blocks  # fmt: skip


def blocks(read: Read, emb: Embedded, indexed: Indexed, size: int) -> list[PairBlock]:
    """The run's training pairs as blocks, each reading doc texts for the n-gram rule."""
    out = pair_blocks(read.pairs, read.known, emb, size)
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
    queries = read.pairs["query_id"].unique(maintain_order=True).to_list()
    counts, flat = Known.of(read.known).flat(queries)
    cuts = np.cumsum(counts)[:-1]
    found = np.split(emb.doc_rows(flat), cuts)
    every = np.split(np.array(flat.to_list(), dtype=object), cuts)
    positives = [ds[rs >= 0].tolist() for ds, rs in zip(every, found)]
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
        rows = [rs[rs >= 0] for rs in found]
        trained = None
        if cfg.mine.ceiling_over == "trained":  # the reference the miner takes: rows' positives
            owner = rows_of(pl.Series(queries), read.pairs["query_id"])
            pos = emb.doc_rows(read.pairs["doc_id"])
            owner, pos = owner[pos >= 0], pos[pos >= 0]
            by = np.lexsort((pos, owner))
            cut = np.searchsorted(owner[by], np.arange(1, len(queries)))
            trained = [np.unique(p) for p in np.split(pos[by], cut)]
        cal = ceiling.calibrate(
            emb.doc_vecs,
            emb.query_vecs[emb.query_rows(queries)],
            rows,
            cfg.mine,
            cfg.mine.calibrate_ceiling,
            cfg.seed,
            trained=trained,
        )
        write_json(path, dataclasses.asdict(cal))
    return dataclasses.replace(cfg.mine, max_relative=cal.max_relative), cal  # fmt: skip


def check(cfg: Config, read: Read, emb: Embedded, indexed: Indexed, mined: Mined,
          cache: Path | None = None) -> Mined:
    """False-negative check, mining quality and teacher scores (an embedder scorer's vectors
    kept in ``cache``), then the manifest's sections on the index, the settings decided at run
    time and the embeddings."""
    pairs, forbidden, known, checks = fncheck.apply(
        cfg,
        mined.pairs,
        mined.forbidden,
        mined.funnel,
        mined.known,
        LazyMap(lambda: read.query_text),
        LazyMap(lambda: read.doc_text),
        cache,
    )
    checks["index_recall"] = indexed.recall
    checks["effective"] = effective_settings(
        cfg, mined.mine, indexed.index.nprobe, mined.calibration, indexed.recall
    )
    checks["embedding_health"] = mined.checks.get("embedding_health") or \
        health.embedding_health(emb.doc_vecs, cfg.seed)  # computed here when no task did
    if mined.calibration is not None:
        checks["ceiling_calibration"] = dataclasses.asdict(mined.calibration)
    same = pairs is mined.pairs  # no check rewrote them: still the mine stage's mapped file
    return dataclasses.replace(mined, pairs=pairs, forbidden=forbidden, known=known, checks=checks,
                               pairs_file=mined.pairs_file if same else None)
