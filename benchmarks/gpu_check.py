"""GPU check, prepared but NOT YET RUN (no GPU was available when it was written; see
docs/benchmarks.md). Prints throughput of the two GPU paths curate takes:

1. embed: ``--texts`` short synthetic texts (8-32 words drawn from the Cranfield vocabulary,
   seeded) through ``curate.embed.Encoder`` on CUDA with embed.dtype=auto (bf16 autocast).
2. mine: ``--queries`` queries against ``--docs`` synthetic clustered unit vectors (generated in
   chunks, as in benchmarks/scale.py) in curate's auto IVF-PQ index, trained and filled on the
   GPU (``curate.index.to_gpu``), searched top-``--k`` in blocks; recall@k against exact search
   (faiss GPU flat, fp16 storage) on 1k sampled queries.

Sized for one H200 (141 GB) within a few minutes:

    .venv/bin/python benchmarks/gpu_check.py --texts 1000000 --docs 10000000 --queries 1000000

Smaller first try: --texts 100000 --docs 1000000 --queries 100000.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
from common import CRANFIELD, machine


def short_texts(n: int, seed: int) -> list[str]:
    words = CRANFIELD.joinpath("corpus.jsonl").read_text().replace('"', " ").split()
    words = [w for w in words if w.isalpha()][:200_000]
    rng = np.random.default_rng(seed)
    lens = rng.integers(8, 33, n)
    picks = rng.integers(0, len(words), int(lens.sum()))
    out, at = [], 0
    for n_words in lens:
        out.append(" ".join(words[i] for i in picks[at : at + n_words]))
        at += n_words
    return out


def embed_check(n: int, chunk: int = 100_000) -> dict:
    import torch

    from curate.config import EmbedConfig
    from curate.embed import Encoder, resolve_model

    texts = short_texts(n, 0)
    enc = Encoder.load(
        EmbedConfig(dtype="auto", device="cuda", max_length=128, token_budget=1 << 18),
        resolve_model("all-MiniLM-L6-v2"),
    )
    enc.encode(texts[:1000])  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    for start in range(0, n, chunk):
        enc.encode(texts[start : start + chunk])
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    res = {
        "texts": n,
        "s": round(dt, 1),
        "texts_per_s": round(n / dt),
        "gpu": torch.cuda.get_device_name(0),
        "peak_gpu_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1),
    }
    print("embed:", res, flush=True)
    return res


def mine_check(n_docs: int, n_queries: int, k: int, nprobe: int, chunk: int = 1_000_000) -> dict:
    import faiss
    from scale import Vectors, recall_at

    from curate.config import IndexConfig
    from curate.index import _GPU_RESOURCES, choose_factory, search, to_gpu

    vecs = Vectors("clustered", 384, 0, max(1, n_docs // 1000), 1.0, chunk)
    factory = choose_factory(n_docs, 384, IndexConfig(flat_max=1))
    cpu = faiss.index_factory(384, factory, faiss.METRIC_INNER_PRODUCT)
    gpu = to_gpu(cpu, nprobe)  # untrained: trained and filled on the GPU
    t = time.perf_counter()
    gpu.train(vecs.rows(0, 0, min(n_docs, 500_000)))
    train_s = time.perf_counter() - t
    t = time.perf_counter()
    for start in range(0, n_docs, chunk):
        gpu.add(vecs.rows(0, start, min(start + chunk, n_docs)))
    add_s = time.perf_counter() - t
    faiss.GpuParameterSpace().set_index_parameter(gpu, "nprobe", nprobe)
    t = time.perf_counter()
    for start in range(0, n_queries, chunk):
        search(gpu, vecs.rows(1, start, min(start + chunk, n_queries)), k, block=65536)
    search_s = time.perf_counter() - t
    # Exact top-k of 1k queries: a GPU flat index filled chunk by chunk (fp16 storage).
    sample = vecs.rows(1, 0, 1000)
    opts = faiss.GpuClonerOptions()
    opts.useFloat16 = True
    flat = faiss.index_cpu_to_gpu(_GPU_RESOURCES[0], 0, faiss.IndexFlatIP(384), opts)
    for start in range(0, n_docs, chunk):
        flat.add(vecs.rows(0, start, min(start + chunk, n_docs)))
    _, exact = flat.search(sample, k)
    _, hits = search(gpu, sample, k)
    res = {
        "factory": factory,
        "docs": n_docs,
        "queries": n_queries,
        "k": k,
        "nprobe": nprobe,
        "train_s": round(train_s, 1),
        "add_s": round(add_s, 1),
        "search_s": round(search_s, 1),
        "queries_per_s": round(n_queries / search_s),
        "recall@k_vs_fp16_flat": round(recall_at(hits, exact), 4),
    }
    print("mine:", res, flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--texts", type=int, default=1_000_000)
    ap.add_argument("--docs", type=int, default=10_000_000)
    ap.add_argument("--queries", type=int, default=1_000_000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--nprobe", type=int, default=64)
    ap.add_argument("--skip-embed", action="store_true")
    args = ap.parse_args()
    import faiss
    import torch

    if not torch.cuda.is_available() or faiss.get_num_gpus() == 0:
        sys.exit(
            "gpu_check: needs a CUDA GPU visible to torch and faiss-gpu (pip install -e '.[gpu]')"
        )
    print("machine:", machine(), "| GPUs:", torch.cuda.device_count(), flush=True)
    out = {"embed": None if args.skip_embed else embed_check(args.texts)}
    out["mine"] = mine_check(args.docs, args.queries, args.k, args.nprobe)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
