"""The driver's memory for the mine stage's blocks (``curate.mine.stage.pair_blocks``), held
while every block is mined: N docs, Q queries with one positive each, blocks of 2,048 queries.

    .venv/bin/python benchmarks/block_memory.py --docs 10000000 --queries 1000000

Prints the resident set the blocks add (after a collection) and the time to build them."""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from read_memory import rss_mb  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=10_000_000)
    ap.add_argument("--queries", type=int, default=1_000_000)
    ap.add_argument("--block", type=int, default=2048, help="mine.query_partition")
    args = ap.parse_args()
    from curate.mine.stage import pair_blocks
    from curate.records import Embedded, Known

    doc_ids = pl.Series("doc_id", [f"d{i}" for i in range(args.docs)])
    q_ids = pl.Series("query_id", [f"q{i}" for i in range(args.queries)])
    emb = Embedded(doc_ids, np.zeros((args.docs, 1), np.float32), q_ids,
                   np.zeros((args.queries, 1), np.float32))  # fmt: skip
    rng = np.random.default_rng(0)
    pos = doc_ids.gather(rng.integers(0, args.docs, args.queries))
    pairs = pl.DataFrame({"query_id": q_ids, "doc_id": pos})
    known = Known(pairs)
    _ = emb.doc_index, emb.query_index  # built before: the embed record holds them already
    gc.collect()
    start, t0 = rss_mb(), time.perf_counter()
    blocks = pair_blocks(pairs, known, emb, args.block)
    wall = time.perf_counter() - t0
    gc.collect()
    print(f"{args.docs} docs, {args.queries} queries: {len(blocks)} blocks hold "
          f"+{rss_mb() - start} MB, built in {wall:.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
