"""A small slice of Cranfield as a BEIR folder, and the pipeline config the reliability, crash
and security tests run on it (2 workers, no training or evaluation: they test the data path)."""

from __future__ import annotations

import json
from pathlib import Path

from curate.batch.shards import MANIFEST

# Ids that look like paths: they must flow through every stage without ever naming a file.
PATH_LIKE_DOC = "../../escape/doc"
PATH_LIKE_QUERY = "/tmp/escape/../query"


def write_slice(root: Path, source: Path, n_queries: int = 40, n_docs: int = 300) -> Path:
    """The first ``n_queries`` train queries, the first ``n_docs`` docs plus every positive of those
    queries and Cranfield's two empty docs (471, 995); one doc id and one query id renamed to
    path-like strings. Train qrels only (no eval split)."""
    lines = (source / "qrels" / "train.tsv").read_text().splitlines()[1:]
    rows = [line.split("\t") for line in lines]
    queries = list(dict.fromkeys(q for q, _, _ in rows))[:n_queries]
    rows = [r for r in rows if r[0] in set(queries)]
    docs = [json.loads(line) for line in (source / "corpus.jsonl").read_text().splitlines()]
    wanted = {d["_id"] for d in docs[:n_docs]} | {d for _, d, _ in rows} | {"471", "995"}
    rename = {queries[0]: PATH_LIKE_QUERY, "2": PATH_LIKE_DOC}
    (root / "qrels").mkdir(parents=True)
    with open(root / "corpus.jsonl", "w") as fh:
        for d in docs:
            if d["_id"] in wanted:
                fh.write(json.dumps({**d, "_id": rename.get(d["_id"], d["_id"])}) + "\n")
    with open(root / "queries.jsonl", "w") as fh:
        for line in (source / "queries.jsonl").read_text().splitlines():
            q = json.loads(line)
            if q["_id"] in set(queries):
                fh.write(json.dumps({**q, "_id": rename.get(q["_id"], q["_id"])}) + "\n")
    out = ["query-id\tcorpus-id\tscore"]
    out += ["\t".join(rename.get(x, x) for x in (q, d)) + f"\t{s}" for q, d, s in rows]
    (root / "qrels" / "train.tsv").write_text("\n".join(out) + "\n")
    return root


def pipeline_config(out: Path, data_dir: Path, model: Path, **sections) -> dict:
    """Small partitions everywhere, so each stage has several to crash in and resume from."""
    cfg = {
        "output_dir": str(out),
        "seed": 7,
        "data": {"path": str(data_dir), "empty_text": "skip", "eval_split": None},
        "embed": {"model": str(model), "max_length": 48, "partition_size": 60, "dtype": "float32"},
        # A random tiny BERT puts every text close together: loosen the score-based filters.
        "mine": {"top_k": 20, "num_negatives": 3, "range_max": 20, "max_relative": None,
                 "near_dup_threshold": 0.99999, "query_partition": 8},
        "batch": {"batch_size": 8, "batches_per_shard": 2},
        "train": {"enabled": False},
        "eval": {"enabled": False},
        "cluster": {"n_workers": 2, "threads_per_worker": 1},
    }  # fmt: skip
    for name, values in sections.items():
        cfg[name] = {**cfg[name], **values} if isinstance(values, dict) else values
    return cfg


def output_bytes(out: Path, differ: tuple[str, ...] = ("output_dir",)) -> dict:
    """Every shard file and the forbidden pairs, byte for byte, plus the manifest without the
    config sections that differ by design (``differ``: output_dir, and the cluster where the
    two runs compared ran on different ones)."""
    files = sorted((out / "shards").glob("*.parquet")) + [out / "forbidden.parquet"]
    got: dict = {p.name: p.read_bytes() for p in files}
    manifest = json.loads((out / MANIFEST).read_text())
    for key in differ:
        manifest["config"].pop(key)
    got["manifest.json"] = manifest
    return got
