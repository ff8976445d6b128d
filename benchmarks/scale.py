"""Index and mine at scale without a model: synthetic unit vectors, IVF-PQ, on one machine.

Docs are generated chunk by chunk from a seed (chunk c from rng([seed, c])) and added to the index
as they come, so the full matrix (10M x 384 float32 = 15 GB) is never held. The exact top-k of
the recall sample is computed by generating the same chunks again and streaming them through a
flat search (a running top-k merged with ``curate.index.merge_topk``).

  random     i.i.d. Gaussian directions: no cluster structure, the worst case for IVF and PQ
  clustered  a mixture of Gaussians, about ``--cluster-size`` docs per cluster:
             x = normalise(mu_c + sigma g), g ~ N(0, I/dim) -> cos(x, mu_c) = 1/sqrt(1 + sigma^2)

Steps timed: train (on the first ``train_sample`` docs, an i.i.d. sample), add (generation
included), mine = streamed top-k search of every query in blocks (curate.index.search; the
per-candidate filters of mine_block cost O(k) per query whatever the corpus size), at query
counts 10k / 30k / 100k, and a recall@k sweep over nprobe on ``--recall-queries`` queries.

    .venv/bin/python benchmarks/scale.py --docs 1000000 --queries 100000 --data random \
        --out /tmp/scale-1M-random.json
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import time

import faiss
import numpy as np
from common import TreeMemory, machine

from curate.config import IndexConfig
from curate.index.build import choose_factory, merge_topk, search, set_search_params, trained_index

log = logging.getLogger("scale")


class Vectors:
    """Deterministic synthetic unit vectors, generated chunk by chunk."""

    def __init__(self, kind: str, dim: int, seed: int, n_clusters: int, sigma: float, chunk: int):
        self.kind, self.dim, self.seed, self.sigma, self.chunk = kind, dim, seed, sigma, chunk
        if kind == "clustered":
            mu = np.random.default_rng([seed, 1 << 30]).standard_normal(
                (n_clusters, dim), np.float32
            )
            self.mu = mu / np.linalg.norm(mu, axis=1, keepdims=True)

    def rows(self, stream: int, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of stream 0 (docs) or 1 (queries), the same whatever the slicing."""
        first, last = start // self.chunk, -(-stop // self.chunk)
        block = np.concatenate([self._chunk(stream, c) for c in range(first, last)])
        return block[start - first * self.chunk : stop - first * self.chunk]

    def _chunk(self, stream: int, c: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, stream, c])
        x = rng.standard_normal((self.chunk, self.dim), dtype=np.float32)
        if self.kind == "clustered":
            x *= self.sigma / np.sqrt(self.dim)
            x += self.mu[rng.integers(0, len(self.mu), self.chunk)]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x


class Clock:
    """Wall and CPU seconds (all threads of this process) of a block ->
    rec[name + "_s"/"_cpu_s"]."""

    def __init__(self, rec: dict, name: str):
        self.rec, self.name = rec, name

    def __enter__(self) -> Clock:
        self.t, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, cpu = time.perf_counter() - self.t, time.process_time() - self.c
        self.rec[f"{self.name}_s"], self.rec[f"{self.name}_cpu_s"] = (
            round(self.wall, 2),
            round(cpu, 2),
        )
        log.info("%s: %.1fs wall, %.1fs CPU", self.name, self.wall, cpu)


def exact_topk(vecs: Vectors, n_docs: int, queries: np.ndarray, k: int):
    """Exact top-k over every doc chunk, regenerated: (D, I) best first."""
    best = None
    for start in range(0, n_docs, vecs.chunk):
        block = vecs.rows(0, start, min(start + vecs.chunk, n_docs))
        flat = faiss.IndexFlatIP(vecs.dim)
        flat.add(block)
        part = search(flat, queries, k)
        best = part if best is None else merge_topk([best, part], [0, start], k)  # best: global ids
    return best


def recall_at(approx: np.ndarray, exact: np.ndarray) -> float:
    k = exact.shape[1]
    return float(np.mean([len(set(a[a >= 0]) & set(e)) / k for a, e in zip(approx, exact)]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--data", choices=["random", "clustered"], default="random")
    ap.add_argument("--cluster-size", type=int, default=1000)
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument(
        "--factory", default="auto", help="faiss index_factory string; auto: curate's choice"
    )
    ap.add_argument("--train-sample", type=int, default=IndexConfig.train_sample)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--nprobes", default="16,32,64,128,256")
    ap.add_argument(
        "--mine-nprobe",
        type=int,
        default=0,
        help="0: the smallest swept nprobe with recall >= 0.95, else the largest",
    )
    ap.add_argument(
        "--k-factor", type=float, default=4.0, help="candidates re-ranked per hit by a Refine stage"
    )
    ap.add_argument("--recall-queries", type=int, default=1000)
    ap.add_argument("--chunk", type=int, default=100_000)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    res = {"args": vars(args), "machine": machine()}
    vecs = Vectors(
        args.data,
        args.dim,
        args.seed,
        max(1, args.docs // args.cluster_size),
        args.sigma,
        args.chunk,
    )
    cfg = IndexConfig(factory=args.factory, flat_max=1, train_sample=args.train_sample)
    factory = choose_factory(args.docs, args.dim, cfg)
    res["factory"] = factory
    mem = TreeMemory(every=0.5)
    with mem:
        with Clock(res, "train"):
            # curate's trainer (polysemous training off) on the first train_sample docs
            sample = vecs.rows(0, 0, min(args.train_sample, args.docs))
            index = trained_index(sample, IndexConfig(factory=factory, train_sample=len(sample)))
            del sample
        with Clock(res, "add"):  # generation included
            for start in range(0, args.docs, args.chunk):
                index.add(vecs.rows(0, start, min(start + args.chunk, args.docs)))
        sample = vecs.rows(1, 0, args.recall_queries)
        with Clock(res, "exact_sample"):
            _, exact = exact_topk(vecs, args.docs, sample, args.k)
        if isinstance(faiss.downcast_index(index), faiss.IndexRefine):
            faiss.downcast_index(index).k_factor = args.k_factor  # re-rank k_factor x k candidates
        res["sweep"] = []
        for nprobe in [int(x) for x in args.nprobes.split(",")]:
            set_search_params(index, nprobe)
            row = {"nprobe": nprobe}
            with Clock(row, "search") as clock:
                _, hits = search(index, sample, args.k)
            row.update(
                recall=round(recall_at(hits, exact), 4), qps=round(len(sample) / clock.wall, 1)
            )
            res["sweep"].append(row)
            log.info(
                "nprobe %d: recall@%d %.4f, %.0f queries/s",
                nprobe,
                args.k,
                row["recall"],
                row["qps"],
            )
        ok = [r["nprobe"] for r in res["sweep"] if r["recall"] >= 0.95]
        mine_nprobe = args.mine_nprobe or (ok[0] if ok else res["sweep"][-1]["nprobe"])
        set_search_params(index, mine_nprobe)
        res["mine"] = {"nprobe": mine_nprobe, "checkpoints": []}
        done = 0
        with Clock(res["mine"], "total"):
            for mark in sorted({m for m in (10_000, 30_000, args.queries) if m <= args.queries}):
                with Clock(row := {"queries": mark}, "step"):
                    for start in range(done, mark, args.chunk):
                        search(index, vecs.rows(1, start, min(start + args.chunk, mark)), args.k)
                done = mark
                res["mine"]["checkpoints"].append(row)
    res["peak_rss_mb"] = round(mem.peak_rss / 2**20)
    res["ru_maxrss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    res["index_mb"] = (
        round(faiss.serialize_index(index).nbytes / 2**20) if args.docs <= 3_000_000 else None
    )
    print(json.dumps(res))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
