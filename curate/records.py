"""What each stage hands the next: one frozen record per stage (docs/architecture.md).

The wiring (pipelines/run.py) only passes these along; a stage reads the fields it needs and
returns its own record. Tables are Arrow or polars as the stage that made them left them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

if TYPE_CHECKING:
    import pyarrow as pa

    from curate.config import IndexConfig, MineConfig
    from curate.mine.ceiling import Calibration
    from curate.read.dataset import Dataset

# report.json's timings, in run order: one per timed step of pipelines.run.
TIMED = ("read", "embed", "index", "recall_guard", "mine", "fncheck", "curate", "train", "evaluate")


@dataclass(frozen=True)
class Read:
    """Stage 1: the validated dataset and what every later stage reads from it."""

    dataset: Dataset  # queries, qrels, stats; its corpus is ``corpus`` (no text column)
    corpus: pl.DataFrame  # doc_id and hash (u64 of the normalised text, dedup.add_text_hash)
    texts: pa.ChunkedArray  # per corpus row: title and text as the model embeds them, memory-
    # mapped from a file (read.stage._CorpusSink); a polars Series or a list also serve
    pairs: pl.DataFrame  # positive (query_id, doc_id) pairs of the train split, sorted
    known: Known  # query_id -> every known positive doc id (train split)
    texts_file: str | None = None  # the Arrow file ``texts`` are mapped from, if they are

    @property
    def query_text(self) -> dict[str, str]:
        q = self.dataset.queries
        return dict(zip(q["query_id"].to_list(), q["text"].to_list()))

    @property
    def doc_text(self) -> dict[str, str]:
        from curate.read.stage import text_list

        return dict(zip(self.corpus["doc_id"].to_list(), text_list(self.texts)))


@dataclass(frozen=True)
class Model:
    """The base model, resolved and fingerprinted before anything is written."""

    path: Path
    fingerprint: str


def id_series(ids: Sequence[str] | pl.Series) -> pl.Series:
    """Ids as one Arrow string column: a Python list holds an object per id (10M at MS MARCO
    scale, ~0.6 GB in the driver)."""
    return ids if isinstance(ids, pl.Series) else pl.Series("id", list(ids), pl.String)


def rows_of(keys: pl.Series, ids: Sequence[str] | pl.Series) -> np.ndarray:
    """The row of each of ``ids`` in ``keys`` (unique; -1 where absent), by a join instead of a
    dict of every key. For many lookups in one set of keys, ``IdRows``."""
    table = pl.DataFrame({"id": keys}).with_row_index("row")
    want = pl.DataFrame({"id": id_series(ids).rename("id")})
    got = want.join(table, on="id", how="left", maintain_order="left")["row"]
    return got.fill_null(-1).to_numpy().astype(np.int64)


class IdRows:
    """``rows_of`` for one set of unique ``keys`` looked up many times: the keys' 64-bit hashes,
    sorted (16 bytes a key), built once. A join or an Arrow set lookup builds a hash table of
    every key per call: measured at 10M doc ids and 7M lookups, 1.1-1.3 GB over the process's
    resident size, where this stays under 0.5 GB. A hash hit counts only when the ids are equal;
    keys whose hashes collide fall back to the join."""

    SEED = 0x5EED  # any fixed seed: hashes are compared only within this process
    CHUNK = 1 << 20  # ids looked up at a time

    def __init__(self, keys: pl.Series):
        self.keys = id_series(keys)
        hashes = self.keys.hash(self.SEED).to_numpy()
        order = np.argsort(hashes, kind="stable")
        self.sorted = hashes[order]
        # Held as long as the record: int32 while the rows fit (40 MB less at 10M docs).
        self.order = order.astype(np.int32) if len(order) < 2**31 else order
        self.exact = not bool((self.sorted[1:] == self.sorted[:-1]).any())

    def __len__(self) -> int:
        return len(self.keys)

    def __call__(self, ids: Sequence[str] | pl.Series) -> np.ndarray:
        ids = id_series(ids)
        if not self.exact or not len(self.keys):
            return rows_of(self.keys, ids)
        rows = np.empty(len(ids), np.int64)
        # A bounded number of ids at a time: each step's hashes, places and the gathered ids to
        # compare are ~70 B an id (0.7 GB for the 10M negatives of 1M mined rows at once).
        for a in range(0, len(ids), self.CHUNK):
            part = ids.slice(a, self.CHUNK)
            wanted = part.hash(self.SEED).to_numpy()
            at = np.minimum(np.searchsorted(self.sorted, wanted), len(self.sorted) - 1)
            hit = self.sorted[at] == wanted
            out = rows[a : a + len(part)]
            out[:] = np.where(hit, self.order[at], -1)
            found = np.flatnonzero(hit)
            same = (self.keys.gather(out[found]) == part.gather(found)).to_numpy()
            out[found[~same]] = -1  # an absent id whose hash is a key's
        return rows


class Known(Mapping):
    """query_id -> its known positive doc ids (in the qrels' order), held as one frame of
    (query_id, doc_id) pairs grouped by query: a dict of lists is ~210 MB of Python objects at
    1M queries. ``flat`` gives many queries' positives at once, as columns."""

    def __init__(self, pairs: pl.DataFrame):
        pairs = pairs.select("query_id", "doc_id")
        # Grouped by query, each query's docs in their order (a stable sort).
        self.pairs = pairs.sort("query_id", maintain_order=True)
        runs = self.pairs["query_id"].rle()  # sorted: one run per query
        self.queries = runs.struct.field("value").rename("query_id")
        lens = runs.struct.field("len").to_numpy().astype(np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        self.index = IdRows(self.queries)

    @classmethod
    def of(cls, known: Mapping[str, Sequence[str]]) -> Known:
        """A ``Known`` as it is, a dict of lists as one."""
        if isinstance(known, Known):
            return known
        return cls(pl.DataFrame({
            "query_id": pl.Series([q for q, ds in known.items() for _ in ds], dtype=pl.String),
            "doc_id": pl.Series([d for ds in known.values() for d in ds], dtype=pl.String),
        }))  # fmt: skip

    def plus(self, pairs: pl.DataFrame) -> Known:
        """These with ``pairs`` (query_id, doc_id) added after each query's own."""
        return Known(pl.concat([self.pairs, pairs.select("query_id", "doc_id")]))

    def flat(self, queries: Sequence[str] | pl.Series) -> tuple[np.ndarray, pl.Series]:
        """-> (how many known positives each of ``queries`` has (0 when none), their doc ids
        one after another in that order)."""
        rows = self.index(queries)
        if not len(self.queries):
            return np.zeros(len(rows), np.int64), self.pairs["doc_id"]
        start = np.where(rows >= 0, self.offsets[np.maximum(rows, 0)], 0)
        counts = np.where(rows >= 0, self.offsets[np.maximum(rows, 0) + 1] - start, 0)
        ends = np.cumsum(counts)
        at = np.arange(int(ends[-1]) if len(ends) else 0) - np.repeat(ends - counts - start, counts)
        return counts, self.pairs["doc_id"].gather(at)

    def __getitem__(self, query_id: str) -> list[str]:
        row = int(self.index([query_id])[0])
        if row < 0:
            raise KeyError(query_id)
        return self.pairs["doc_id"][self.offsets[row] : self.offsets[row + 1]].to_list()

    def __len__(self) -> int:
        return len(self.queries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.queries)


@dataclass(frozen=True)
class Embedded:
    """Stage 2: unit vectors of docs and queries, rows in id order. The ids are kept as Arrow
    columns (lists are converted): the driver holds no Python object per document."""

    doc_ids: pl.Series
    doc_vecs: np.ndarray  # [docs, dim]
    query_ids: pl.Series
    query_vecs: np.ndarray  # [queries, dim]

    def __post_init__(self) -> None:
        object.__setattr__(self, "doc_ids", id_series(self.doc_ids).rename("doc_id"))
        object.__setattr__(self, "query_ids", id_series(self.query_ids).rename("query_id"))

    # Built on first use and kept: the mine and batch stages look doc ids up several times.
    @cached_property
    def doc_index(self) -> IdRows:
        return IdRows(self.doc_ids)

    @cached_property
    def query_index(self) -> IdRows:
        return IdRows(self.query_ids)

    def doc_rows(self, ids: Sequence[str] | pl.Series) -> np.ndarray:
        return self.doc_index(ids)

    def query_rows(self, ids: Sequence[str] | pl.Series) -> np.ndarray:
        return self.query_index(ids)


@dataclass(frozen=True)
class Indexed:
    """Stage 3: the index files in the work folder, checked by the recall guard."""

    work: Path
    fingerprint: str  # of the embeddings and index settings the files were built from
    index: IndexConfig  # as searched: nprobe as the recall guard left it
    recall: dict  # the recall guard's record (manifest: index_recall)


@dataclass(frozen=True)
class Mined:
    """Stage 4: kept negatives per training pair, the forbidden pairs and every drop counted."""

    pairs: pa.Table  # schema.MINED
    forbidden: pa.Table  # schema.FORBIDDEN
    funnel: dict  # reason -> candidates dropped (and "candidates", "kept")
    known: Known  # known positives, plus those the false-negative check relabelled
    mine: MineConfig  # as mined: max_relative as the ceiling calibration left it
    calibration: Calibration | None
    checks: dict  # manifest sections: fncheck, mining_quality, index_recall, effective, ...
    pairs_file: str | None = None  # the Arrow file ``pairs`` are mapped from, if they are


@dataclass(frozen=True)
class Curated:
    """Stage 5: the shards, the forbidden pairs and the manifest, written."""

    shards: Path
    summary: dict  # the manifest's counts, funnel, warnings, effective and check sections
