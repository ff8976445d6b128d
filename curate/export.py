"""Exports of the shards for other trainers, each loadable unchanged by its consumer.

- ``sentence-transformers``: Parquet with columns anchor, positive, negative_1..n (the layout
  MultipleNegativesRankingLoss takes), plus ``batches.json`` with the batch sizes; pass
  ``batch_sampler=ShardOrderSampler.from_export(folder)`` to SentenceTransformerTrainingArguments
  to train on curate's batches in curate's order instead of a random re-batching.
- ``flagembedding``: JSONL lines {query, pos, neg, pos_scores, neg_scores}, in batch order
  (FlagEmbedding's fine-tuning data format).
- The shard folder itself loads with ``datasets.load_dataset("parquet", data_files="<shards>/shard-*.parquet")``;
  ``split="train"`` keeps file and row order, so batches stay contiguous (sort by batch_id to be
  sure, and turn off shuffling in the consumer).

Rows with fewer than n negatives cannot fill negative_1..n: they are left out and counted.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pyarrow as pa

from curate.shards import iter_batches, write_json, write_table

log = logging.getLogger(__name__)


def _rows(shard_dir: Path):
    for b, table in iter_batches(shard_dir):
        yield b, table.to_pylist()


def to_sentence_transformers(shard_dir: Path, out_dir: Path, num_negatives: int | None = None) -> dict:
    """-> counts; writes out_dir/train.parquet and out_dir/batches.json."""
    batches = [(b, rows) for b, rows in _rows(shard_dir)]
    n = num_negatives
    if n is None:  # the largest n every row can fill
        n = min(len(r["neg_ids"]) for _, rows in batches for r in rows)
    cols: dict[str, list] = {"anchor": [], "positive": [], **{f"negative_{i + 1}": [] for i in range(n)}}
    sizes, dropped = [], 0
    for _, rows in batches:
        kept = [r for r in rows if len(r["negs"]) >= n]
        dropped += len(rows) - len(kept)
        if not kept:
            continue
        sizes.append(len(kept))
        for r in kept:
            cols["anchor"].append(r["query"])
            cols["positive"].append(r["pos"])
            for i in range(n):
                cols[f"negative_{i + 1}"].append(r["negs"][i])
    out_dir.mkdir(parents=True, exist_ok=True)
    write_table(out_dir / "train.parquet", pa.table(cols))
    write_json(out_dir / "batches.json", {"batch_sizes": sizes, "num_negatives": n})
    counts = {"rows": sum(sizes), "batches": len(sizes), "rows_dropped_short": dropped, "num_negatives": n}
    log.info("sentence-transformers export: %s", counts)
    return counts


def to_flagembedding(shard_dir: Path, out_path: Path) -> dict:
    """One JSON line per row, in batch order; scores are the miner's (or a teacher's) scores."""
    tmp = out_path.with_name(out_path.name + ".tmp")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        for _, rows in _rows(shard_dir):
            for r in rows:
                line = {
                    "query": r["query"], "pos": [r["pos"]], "neg": r["negs"],
                    "pos_scores": [r["pos_score"]], "neg_scores": r["neg_scores"],
                }
                fh.write(json.dumps(line, ensure_ascii=False) + "\n")
                n += 1
    os.replace(tmp, out_path)
    return {"rows": n}


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
            raise ValueError(f"dataset has {len(dataset)} rows, batches.json {sum(self.batch_sizes)}")
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
