"""What a shard folder's batches put in front of the loss (issue #12's "rows per query in a batch").

For every batch: rows, distinct queries and topics, the most rows of one query and of one topic;
for every softmax row (one per shard row): columns, columns the trainer's mask removes, and the
negatives left in the denominator. Reads what was written, builds the mask with the trainer's own
code (``train.train.batch_columns`` / ``batch_masks``), trains nothing.

    .venv/bin/python benchmarks/batch_stats.py runs/nf/shards [--steps 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl


def batch_stats(shard_dir: Path, steps: int | None = None) -> dict:
    from curate.batch.shards import iter_batches
    from curate.config import TrainConfig
    from train.train import batch_columns, batch_masks, load_forbidden

    forbidden, cfg = load_forbidden(shard_dir), TrainConfig()
    per_batch, per_row = [], []
    for b, table in iter_batches(shard_dir):
        if steps is not None and b >= steps:
            break
        rows = pl.from_arrow(table)
        _, _, col_ids, known, rejected = batch_columns(rows, forbidden)
        mask, _ = batch_masks(cfg, col_ids, known, rejected)
        queries, topics = Counter(rows["query_id"].to_list()), Counter(rows["topic"].to_list())
        per_batch.append([rows.height, len(queries), max(queries.values()), len(topics),
                          max(topics.values())])
        m = mask.numpy()
        for i in range(rows.height):
            masked = int(m[i].sum()) - int(m[i, i])  # the row's own positive is never masked
            per_row.append([len(col_ids), masked, len(col_ids) - 1 - masked])
    pb, pr = np.array(per_batch, dtype=float), np.array(per_row, dtype=float)
    return {
        "batches": len(pb),
        "rows_per_batch": float(pb[:, 0].mean()),
        "queries_per_batch": float(pb[:, 1].mean()),
        "max_rows_of_one_query": float(pb[:, 2].mean()),
        "topics_per_batch": float(pb[:, 3].mean()),
        "max_rows_of_one_topic": float(pb[:, 4].mean()),
        "columns_per_row": float(pr[:, 0].mean()),
        "masked_share": float(pr[:, 1].sum() / max((pr[:, 0] - 1).sum(), 1)),
        "negatives_left_per_row": float(pr[:, 2].mean()),
        "rows_with_under_4_negatives_left": float((pr[:, 2] < 4).mean()),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("shards", type=Path)
    p.add_argument("--steps", type=int, default=None, help="only the first N batches (a trainer's)")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    out = batch_stats(a.shards, a.steps)
    print(json.dumps(out, indent=1))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
