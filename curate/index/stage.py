"""Stage 3's files: the index fingerprint and the arrays mine tasks memory-map. The index
shards themselves are built on the cluster (pipelines.stages.index_stage, pipelines.searching)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from itertools import chain
from pathlib import Path

import numpy as np

from curate.config import Config
from curate.files import atomic_path, atomic_write_bytes, npy_file
from curate.index.build import RECORD, write_record
from curate.mine.negatives import write_doc_ids, write_doc_texts
from curate.records import Embedded, Model, Read
from curate.text import content_hash

STAMP = "index.fingerprint"  # in the work folder: which embeddings the index files are of


def fingerprint(cfg: Config, model: Model, emb: Embedded) -> str:
    """Of the model, the index settings and the doc vectors: equal means the files still hold.
    Vectors in a file the embed stage named by its content are known by that name, so the
    driver does not read them all (at 10M x 384 dims, 15 GB) to hash them."""
    src = npy_file(emb.doc_vecs)
    named = src is not None and Path(src).name.startswith(("vectors-", "given-"))
    vecs = Path(src).name if named else str(float(emb.doc_vecs.sum()))
    settings = json.dumps(dataclasses.asdict(cfg.index), sort_keys=True)
    # The ids streamed from their column: unpacked into a list they would be a Python object
    # per document.
    return content_hash(chain([model.fingerprint, settings], emb.doc_ids,
                              [str(emb.doc_vecs.shape), vecs]))  # fmt: skip


def is_built(work: Path, fp: str) -> bool:
    stamp = work / STAMP
    ready = all((work / n).is_file() for n in ("doc_texts.arrow", "doc_ids.arrow", RECORD))
    return stamp.is_file() and stamp.read_text() == fp and ready


def write_inputs(work: Path, read: Read, emb: Embedded) -> None:
    """Doc texts (n-gram rule), vectors, text hashes and ids, as the mine tasks read them."""
    if read.texts_file is not None:
        _link(read.texts_file, work / "doc_texts.arrow")  # the read stage's file: no text read here
    else:
        write_doc_texts(work / "doc_texts.arrow", read.texts)
    if source := npy_file(emb.doc_vecs):
        _link(source, work / "doc_vecs.npy")  # no vector passes through the driver
    else:
        with atomic_path(work / "doc_vecs.npy", ".tmp.npy") as tmp:  # never into a linked file
            np.save(tmp, emb.doc_vecs)
    np.save(work / "doc_hash.npy", read.corpus["hash"].to_numpy().astype(np.uint64, copy=False))
    write_doc_ids(work / "doc_ids.arrow", emb.doc_ids)


def _link(source: str, path: Path) -> None:
    """A second name for the same bytes (15 GB of vectors at 10M x 384), else a copy."""
    with atomic_path(path) as tmp:
        tmp.unlink(missing_ok=True)  # a crashed run's name: never write through it
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)


def mark_built(work: Path, fp: str, cfg: Config, model: Model, emb: Embedded) -> None:
    """After the index shards: the record the queries are checked against, then the stamp."""
    write_record(work, cfg.embed.model, model.fingerprint, emb.doc_vecs.shape[1], len(emb.doc_ids))
    atomic_write_bytes(work / STAMP, fp.encode())
