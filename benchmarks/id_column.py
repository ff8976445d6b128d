"""What a mine or shard task pays for the doc ids it names: the index stage's Parquet id column
read whole (before 2026-12-03) against the mapped Arrow id file (``negatives.load_doc_ids``).

    python benchmarks/id_column.py --ids WORK/doc_ids.arrow --mode mapped --rows 60000
    python benchmarks/id_column.py --ids WORK/doc_ids.parquet --mode parquet --rows 60000

Run the two side by side (paired) for a ratio; each run prints its wall time and peak RSS.
``--make-arrow OUT`` writes the Parquet ``--ids`` as the mapped file (same ids, same order)."""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ids", required=True)
    ap.add_argument("--mode", choices=["parquet", "mapped"], default="mapped")
    ap.add_argument("--rows", type=int, default=60_000, help="doc numbers taken, as one task")
    ap.add_argument("--tasks", type=int, default=1, help="tasks run one after another")
    ap.add_argument("--make-arrow", metavar="OUT", help="write the Parquet --ids as OUT, mapped")
    args = ap.parse_args()
    if args.make_arrow:
        from curate.mine.negatives import write_doc_ids

        write_doc_ids(Path(args.make_arrow), pq.read_table(args.ids).column("doc_id"))
        return
    from curate.mine.negatives import _open_column, load_doc_ids

    t0 = time.perf_counter()
    for t in range(args.tasks):
        if args.mode == "parquet":
            ids = pq.ParquetFile(args.ids).read().column("doc_id").combine_chunks()
        else:
            _open_column.cache_clear()  # each task maps afresh, as a new worker would
            ids = load_doc_ids(args.ids)
        rows = np.sort(np.random.default_rng(t).integers(0, len(ids), args.rows))
        taken = ids.take(pa.array(rows))
        assert len(taken) == args.rows
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.mode}: {args.tasks} task(s) x {args.rows} ids of {len(ids)} in {wall:.2f}s, "
          f"peak RSS {peak:.0f} MB")


if __name__ == "__main__":
    main()
