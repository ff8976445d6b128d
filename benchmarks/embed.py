"""Embedding throughput: curate vs ``SentenceTransformer.encode``, same model, same max length.

Texts: the Cranfield corpus (1398 non-empty docs, title + text as the pipeline joins them) and its
225 queries. Model: the packaged all-MiniLM-L6-v2. Every side is loaded before it is timed and
the sides run round-robin ``--repeats`` times (best pass kept), so load from other jobs on a
shared machine hits them alike.

  st               SentenceTransformer.encode(batch_size=32, normalize_embeddings=True), fp32
  st-bf16          the same with the model's weights cast to bf16 (not ST's default; for reference)
  curate           curate.embed.Encoder, embed.dtype=auto (bf16 weights on a CPU with native bf16)
  curate-fp32      the same with embed.dtype=float32 (isolates token-budget batching)
  curate-dask      the pipeline path: pipelines.embedding.embed_texts on a LocalCluster shaped from
                   the cores, one task per partition (tokenise + embed + write Parquet), fresh
                   cache each pass; workers warmed first (model loaded) -- the cold first pass,
                   with model loading in the workers, is reported separately.

    .venv/bin/python benchmarks/embed.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
import warnings
from pathlib import Path

from common import cranfield, machine

warnings.filterwarnings("ignore")


def st_side(bf16: bool, max_length: int):
    import torch
    from sentence_transformers import SentenceTransformer

    from curate.embed.encoder import resolve_model

    model = SentenceTransformer(str(resolve_model("all-MiniLM-L6-v2")), device="cpu")
    model.max_seq_length = max_length
    if bf16:
        model.to(torch.bfloat16)

    def encode(texts: list[str]):
        return model.encode(
            texts, batch_size=32, normalize_embeddings=True, show_progress_bar=False
        )

    return encode


def curate_side(dtype: str, max_length: int):
    from curate.config import EmbedConfig
    from curate.embed.encoder import Encoder, resolve_model

    enc = Encoder.load(
        EmbedConfig(dtype=dtype, max_length=max_length), resolve_model("all-MiniLM-L6-v2")
    )
    return enc.encode


class DaskSide:
    """The pipeline's embedding stage on a LocalCluster; each call embeds into a fresh cache."""

    def __init__(self, max_length: int):
        from curate.config import ClusterConfig, EmbedConfig
        from curate.embed.encoder import model_fingerprint, resolve_model
        from pipelines.cluster import connect

        self.path = resolve_model("all-MiniLM-L6-v2")
        self.fp = model_fingerprint(self.path)
        self.cfg = EmbedConfig(max_length=max_length, partition_size=256)
        self.ctx = connect(ClusterConfig(), quiet=True)
        t = time.perf_counter()
        self.workers = self.ctx.__enter__()
        self.startup_s = time.perf_counter() - t
        self.tmp = Path(tempfile.mkdtemp(prefix="curate-bench-embed-"))
        self.calls = 0

    def __call__(self, texts: list[str]):
        from pipelines.embedding import embed_texts

        self.calls += 1
        cache = self.tmp / f"pass-{self.calls}"
        ids = [str(i) for i in range(len(texts))]
        _, vecs = embed_texts(self.workers, ids, texts, "", self.path, self.fp, self.cfg, cache)
        shutil.rmtree(cache)
        return vecs

    def close(self) -> None:
        self.ctx.__exit__(None, None, None)
        shutil.rmtree(self.tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--sides", default="st,st-bf16,curate,curate-fp32,curate-dask")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    _, docs, _, queries, _ = cranfield()
    texts = docs + queries
    names = args.sides.split(",")
    sides, extra = {}, {}
    for name in names:
        if name == "curate-dask":
            dask = DaskSide(args.max_length)
            t = time.perf_counter()
            dask(texts)  # cold: every worker loads the model inside its first task
            extra = {
                "dask_startup_s": round(dask.startup_s, 2),
                "dask_cold_pass_s": round(time.perf_counter() - t, 2),
                "dask_workers": dask.workers.n_workers,
                "torch_threads_per_worker": dask.workers.torch_threads,
            }
            sides[name] = dask
        elif name.startswith("st"):
            sides[name] = st_side(name == "st-bf16", args.max_length)
        else:
            sides[name] = curate_side(
                "float32" if name == "curate-fp32" else "auto", args.max_length
            )
        if name != "curate-dask":
            sides[name](texts[:64])  # warm-up
    best = {n: float("inf") for n in names}
    for _ in range(args.repeats):
        for n in names:
            t = time.perf_counter()
            sides[n](texts)
            best[n] = min(best[n], time.perf_counter() - t)
    if "curate-dask" in sides:
        sides["curate-dask"].close()
    base = best[names[0]]
    rows = {
        n: {
            "texts_per_s": round(len(texts) / best[n], 1),
            "x_" + names[0]: round(base / best[n], 2),
        }
        for n in names
    }
    print(
        f"machine: {machine()}; {len(texts)} texts ({len(docs)} docs + {len(queries)} queries), "
        f"max_length {args.max_length}, best of {args.repeats}"
    )
    for n in names:
        print(
            f"{n:<12} {rows[n]['texts_per_s']:>8} texts/s   {rows[n]['x_' + names[0]]:>5}x "
            f"{names[0]}"
        )
    if extra:
        cold = len(texts) / extra["dask_cold_pass_s"]
        print(
            f"curate-dask: cluster start {extra['dask_startup_s']}s, cold first pass "
            f"{extra['dask_cold_pass_s']}s "
            f"({cold:.1f} texts/s, "
            f"{base and len(texts) / base and cold / (len(texts) / base):.2f}x {names[0]}), "
            f"{extra['dask_workers']} workers x {extra['torch_threads_per_worker']} torch threads"
        )
    print(json.dumps({"rows": rows, **extra}))


if __name__ == "__main__":
    main()
