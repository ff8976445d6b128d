"""Exports of the shards for other trainers, each loadable unchanged by its consumer.

- ``sentence-transformers``: Parquet with columns anchor, positive, negative_1..n (the layout
  MultipleNegativesRankingLoss takes), plus ``batches.json`` with the batch sizes; pass
  ``batch_sampler=ShardOrderSampler.from_export(folder)`` to SentenceTransformerTrainingArguments
  to train on curate's batches in curate's order instead of a random re-batching.
- ``flagembedding``: JSONL lines {query, pos, neg, pos_scores, neg_scores}, in batch order
  (FlagEmbedding's fine-tuning data format). FlagEmbedding samples train_group_size - 1
  negatives from ``neg`` (with replacement where it is shorter) and fails on an empty one.
- The shard folder itself loads as one table: ``pyarrow.parquet.read_table(shards)``,
  ``pandas.read_parquet``, ``polars.read_parquet`` and
  ``datasets.load_dataset("parquet", data_dir=shards, split="train")``, in file and row order,
  so batches stay contiguous (sort by batch_id to be sure, and turn off shuffling).

n is the run's ``mine.num_negatives`` (from the manifest) unless given. A row with fewer than n
negatives is handled by ``short``: ``drop`` leaves it out; ``repeat`` cycles its own negatives
(and their scores) up to n, which repeats a negative's term in the loss, and still drops a row
with none. The counts go to ``<destination>.json`` beside the export (not inside it:
FlagEmbedding reads every .json/.jsonl of a folder).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa

from curate.batch.shards import iter_batches, read_manifest
from curate.errors import CurateError
from curate.files import atomic_path, write_json, write_table

log = logging.getLogger(__name__)

SHORT_POLICIES = ("drop", "repeat")


def _rows(shard_dir: Path):
    for b, table in iter_batches(shard_dir):
        yield b, table.to_pylist()


def _num_negatives(shard_dir: Path, n: int | None) -> int:
    """``n``, or the run's mine.num_negatives from the manifest's config."""
    if n is None:
        n = (read_manifest(shard_dir).get("config") or {}).get("mine", {}).get("num_negatives")
        if n is None:
            raise CurateError(
                f"{shard_dir}: the manifest has no config.mine.num_negatives; pass --num-negatives"
            )
    if n < 0:
        raise CurateError(f"--num-negatives {n}: must be 0 or more")
    return n


def _fit(row: dict, n: int, short: str) -> tuple[list, list] | None:
    """(negs, neg_scores) of ``row`` with at least n items, or None where the row is dropped."""
    negs, scores = row["negs"], row["neg_scores"]
    if len(negs) >= n:
        return negs, scores
    if short == "repeat" and negs:
        reps = -(-n // len(negs))  # ceil
        return (negs * reps)[:n], (scores * reps)[:n]
    return None


class _Counter:
    """The counts written beside an export: every row is written or dropped, never both."""

    def __init__(self, fmt: str, n: int, short: str):
        if short not in SHORT_POLICIES:
            raise CurateError(f"short={short!r}: choose one of {', '.join(SHORT_POLICIES)}")
        self.counts = {"format": fmt, "num_negatives": n, "short": short, "rows_in": 0,
                       "rows_written": 0, "rows_dropped": 0, "rows_filled": 0,
                       "rows_without_negatives": 0}  # fmt: skip

    def add(self, row: dict, fitted: tuple[list, list] | None) -> None:
        c = self.counts
        c["rows_in"] += 1
        c["rows_without_negatives"] += not row["negs"]
        c["rows_written" if fitted else "rows_dropped"] += 1
        c["rows_filled"] += bool(fitted) and len(row["negs"]) < c["num_negatives"]

    def write(self, path: Path) -> dict:
        write_json(path, self.counts)
        log.info("%s export: %s", self.counts["format"], self.counts)
        return self.counts


def counts_path(dest: Path) -> Path:
    """``dest`` (a folder or a .jsonl file) -> the counts file beside it."""
    dest = Path(dest)
    return dest.with_name(f"{dest.stem if dest.suffix == '.jsonl' else dest.name}.json")


def to_sentence_transformers(
    shard_dir: Path, out_dir: Path, num_negatives: int | None = None, short: str = "drop"
) -> dict:
    """-> counts; writes out_dir/train.parquet, out_dir/batches.json and the counts beside."""
    n = _num_negatives(shard_dir, num_negatives)
    counter = _Counter("sentence-transformers", n, short)
    negative_cols = [f"negative_{i + 1}" for i in range(n)]
    cols: dict[str, list] = {"anchor": [], "positive": [], **{c: [] for c in negative_cols}}
    sizes = []
    for _, rows in _rows(shard_dir):
        kept = 0
        for r in rows:
            fitted = _fit(r, n, short)
            counter.add(r, fitted)
            if fitted is None:
                continue
            kept += 1
            cols["anchor"].append(r["query"])
            cols["positive"].append(r["pos"])
            for col, neg in zip(negative_cols, fitted[0]):
                cols[col].append(neg)
        if kept:
            sizes.append(kept)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_table(out_dir / "train.parquet", pa.table(cols))
    write_json(out_dir / "batches.json", {"batch_sizes": sizes, "num_negatives": n})
    counter.counts["batches"] = len(sizes)
    return counter.write(counts_path(out_dir))


def flagembedding_file(dest: Path) -> Path:
    """The JSONL file of a FlagEmbedding export to ``dest`` (a .jsonl file, or a folder)."""
    dest = Path(dest)
    return dest if dest.suffix == ".jsonl" else dest / "train.jsonl"


def to_flagembedding(
    shard_dir: Path, dest: Path, num_negatives: int | None = None, short: str = "drop"
) -> dict:
    """-> counts; one JSON line per row with at least n negatives (all it has), in batch order,
    to ``flagembedding_file(dest)``, and the counts beside ``dest``. Scores are the miner's (or
    a teacher's)."""
    # FlagEmbedding divides by len(neg): even with n = 0 a line needs one negative.
    n = max(_num_negatives(shard_dir, num_negatives), 1)
    counter = _Counter("flagembedding", n, short)
    out_path = flagembedding_file(dest)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for _, rows in _rows(shard_dir):
            for r in rows:
                fitted = _fit(r, n, short)
                counter.add(r, fitted)
                if fitted is None:
                    continue
                line = {
                    "query": r["query"], "pos": [r["pos"]], "neg": fitted[0],
                    "pos_scores": [r["pos_score"]], "neg_scores": fitted[1],
                }  # fmt: skip
                fh.write(json.dumps(line, ensure_ascii=False) + "\n")
    return counter.write(counts_path(dest))


class ShardOrderSampler:
    """A batch sampler yielding curate's batches in order (for sentence-transformers' Trainer,
    whose ``batch_sampler`` argument accepts a callable returning a sampler)."""

    def __init__(self, batch_sizes: list[int]):
        self.batch_sizes = batch_sizes

    @classmethod
    def from_export(cls, folder: Path) -> ShardOrderSampler:
        return cls(json.loads((Path(folder) / "batches.json").read_text())["batch_sizes"])

    def __call__(self, dataset, **_ignored) -> ShardOrderSampler:
        if len(dataset) != sum(self.batch_sizes):
            raise ValueError(f"dataset has {len(dataset)} rows, batches.json "
                             f"{sum(self.batch_sizes)}")
        return self

    def __iter__(self):
        start = 0
        for size in self.batch_sizes:
            yield list(range(start, start + size))
            start += size

    def __len__(self) -> int:
        return len(self.batch_sizes)

    def set_epoch(self, epoch: int) -> None:  # the Trainer calls this; order is fixed by design
        pass
