"""Mining end to end: curate (embed + index + mine, through the pipeline) vs sentence-transformers'
``util.mine_hard_negatives(use_faiss=True)`` on the Cranfield train pairs, same model and settings.

Each side runs in its own subprocess (python start-up and imports included), measured from
outside: wall time, CPU seconds of the whole process tree, and the peak of the summed RSS and PSS
of the tree (Dask worker processes, where a run has them, are separate processes; PSS
shares library pages fairly).
Runs (``RUNS``): each side cold (empty caches), then warm (embeddings cached: curate's
content-addressed cache, ST's ``cache_folder``), then warm variants: curate without its n-gram
rule, and both sides without a ceiling (for the overlap). Overlap: per (query, positive) pair,
the share of ST's negatives that curate also chose, compared by text (ST de-duplicates the corpus
by text).

Settings, both sides: all-MiniLM-L6-v2, max length 256, 7 negatives, "top" sampling, candidates
from the top range_max (ST: range_max after dropping the query's positives, searching
range_max + max_positives; curate: top_k = range_max + max_positives, every rank kept), and the
NV-Retriever 95% ceiling (ST relative_margin=0.05, curate max_relative=0.95). The ceilings differ
with several positives: ST takes the query's weakest positive, curate (curate/mine.py) its
best-scoring one, so ST drops far more candidates on Cranfield (~7 positives per query). curate
also drops duplicates / near-duplicates / n-gram duplicates of the positives, which ST does not.
curate runs with training, evaluation and the optional scorers off (embed, index, mine, curate
batches and write shards).

    .venv/bin/python benchmarks/mine.py [--range-max 50] [--negatives 7]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

from common import CRANFIELD, machine, run_side

warnings.filterwarnings("ignore")


def pairs():
    """Cranfield train pairs (query text, positive text) and the corpus texts, as curate reads
    them."""
    import polars as pl

    from curate.config import DataConfig
    from curate.read.dataset import read_dataset
    from curate.read.stage import doc_texts

    ds = read_dataset(DataConfig(path=str(CRANFIELD), empty_text="skip"))
    text = dict(zip(ds.corpus["doc_id"].to_list(), doc_texts(ds.corpus)))
    qtext = dict(zip(ds.queries["query_id"].to_list(), ds.queries["text"].to_list()))
    train = ds.qrels["train"].filter(pl.col("score") > 0).sort("query_id", "doc_id")
    rows = [(q, d, qtext[q], text[d]) for q, d in train.select("query_id", "doc_id").iter_rows()]
    return rows, text


def side_st(args, work: Path) -> dict:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    from curate.embed.encoder import resolve_model

    t0 = time.perf_counter()
    rows, text = pairs()
    model = SentenceTransformer(str(resolve_model("all-MiniLM-L6-v2")), device="cpu")
    model.max_seq_length = args.max_length
    data = Dataset.from_dict({"query": [r[2] for r in rows], "positive": [r[3] for r in rows]})
    mined = mine_hard_negatives(
        data,
        model,
        corpus=list(text.values()),
        range_min=0,
        range_max=args.range_max,
        relative_margin=(1 - args.ceiling) if args.ceiling else None,
        num_negatives=args.negatives,
        sampling_strategy="top",
        use_faiss=True,
        output_format="labeled-list",
        cache_folder=str(work / "st-cache"),
        verbose=False,
    )
    negs = {(r["query"], r["positive"][0]): r["positive"][1:] for r in mined}
    out = {f"{q}\t{d}": negs.get((qt, dt), []) for q, d, qt, dt in rows}
    return {"inner_s": round(time.perf_counter() - t0, 2), "negatives": out}


def side_curate(args, work: Path) -> dict:
    import polars as pl

    from curate.config import config_from_dict
    from pipelines.run import run

    rows, text = pairs()
    max_pos = max(pl.DataFrame({"q": [r[0] for r in rows]}).group_by("q").len()["len"].to_list())
    top_k = args.range_max + max_pos
    cfg = config_from_dict(
        {
            "output_dir": str(work / "curate-out"),
            "cache_dir": str(work / "curate-cache"),
            "data": {"path": str(CRANFIELD), "empty_text": "skip"},
            "embed": {"max_length": args.max_length, "dtype": args.curate_dtype},
            "mine": {
                "top_k": top_k,
                "range_max": top_k,
                "num_negatives": args.negatives,
                "max_relative": args.ceiling or None,
                **({"ngram_threshold": None} if args.no_ngram else {}),
                "strategy": "top",
            },
            "train": {"enabled": False},
            "eval": {"enabled": False},
        }
    )
    t0 = time.perf_counter()
    result = run(cfg, quiet=True)
    inner = round(time.perf_counter() - t0, 2)
    parts = sorted((work / "curate-out" / "work" / "mined").glob("*.parquet"))
    mined = pl.concat(
        [pl.read_parquet(p) for p in parts if not p.name.endswith(".forbidden.parquet")]
    )
    out = {
        f"{q}\t{d}": [text[n] for n in negs[: args.negatives]]  # not the spares
        for q, d, negs in mined.select("query_id", "pos_id", "neg_ids").iter_rows()
    }
    shutil.rmtree(work / "curate-out")  # the embedding cache stays for the warm run
    return {"inner_s": inner, "timings": result["timings"], "negatives": out}


def overlap(st: dict, cur: dict, k: int) -> dict:
    shared = [len(set(st[p]) & set(cur.get(p, []))) / max(len(st[p]), 1) for p in st if st[p]]
    return {
        "pairs": len(shared),
        "mean_overlap": round(sum(shared) / max(len(shared), 1), 4),
        "st_negs_per_pair": round(sum(map(len, st.values())) / len(st), 2),
        "curate_negs_per_pair": round(sum(map(len, cur.values())) / max(len(cur), 1), 2),
    }


RUNS = [  # (label, side, extra arguments); all "warm" runs reuse the caches of the cold ones
    ("st-cold", "st", []),
    ("curate-cold", "curate", []),
    ("st-warm", "st", []),
    ("curate-warm", "curate", []),
    ("curate-warm-no-ngram", "curate", ["--no-ngram"]),  # without the filter ST does not have
    ("st-warm-no-ceiling", "st", ["--ceiling=0"]),  # overlap without either ceiling rule
    ("curate-warm-no-ceiling", "curate", ["--ceiling=0"]),
]
COMPARE = [  # (name, ST run, curate run)
    ("cold", "st-cold", "curate-cold"),
    ("warm", "st-warm", "curate-warm"),
    ("warm, curate n-gram rule off", "st-warm", "curate-warm-no-ngram"),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", choices=["st", "curate"])
    ap.add_argument("--work")
    ap.add_argument("--range-max", type=int, default=50)
    ap.add_argument("--negatives", type=int, default=7)
    ap.add_argument("--ceiling", type=float, default=0.95, help="0: no ceiling rule on either side")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--curate-dtype", default="auto")
    ap.add_argument("--no-ngram", action="store_true", help="curate: n-gram duplicate rule off")
    ap.add_argument("--extra-fp32", action="store_true", help="also run curate in fp32 (overlap)")
    args = ap.parse_args()
    if args.side:  # one side, in a subprocess: print its JSON result as the last line
        fn = side_st if args.side == "st" else side_curate
        print(json.dumps(fn(args, Path(args.work))))
        return
    common = [
        f"--range-max={args.range_max}",
        f"--negatives={args.negatives}",
        f"--max-length={args.max_length}",
    ]
    runs = RUNS + (
        [("curate-fp32", "curate", ["--curate-dtype=float32"])] if args.extra_fp32 else []
    )
    work = Path(tempfile.mkdtemp(prefix="curate-bench-mine-"))
    res = {}
    try:
        for label, side, extra in runs:
            sub = work / ("fp32" if "fp32" in label else "main")
            sub.mkdir(exist_ok=True)
            ceiling = (
                []
                if any(e.startswith("--ceiling") for e in extra)
                else [f"--ceiling={args.ceiling}"]
            )
            argv = [__file__, f"--side={side}", f"--work={sub}", *common, *ceiling, *extra]
            r = res[label] = run_side(argv)
            print(
                f"{label}: wall {r['wall_s']}s cpu {r['cpu_s']}s peak RSS {r['peak_rss_mb']} MB "
                f"PSS {r['peak_pss_mb']} MB",
                file=sys.stderr,
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"machine: {machine()}; Cranfield train pairs, range_max {args.range_max}, "
        f"{args.negatives} negatives, ceiling {args.ceiling}"
    )
    print(f"{'run':<24} {'wall s':>7} {'cpu s':>7} {'RSS MB':>7} {'PSS MB':>7}")
    for label, r in res.items():
        print(
            f"{label:<24} {r['wall_s']:>7} {r['cpu_s']:>7} {r['peak_rss_mb']:>7} "
            f"{r['peak_pss_mb']:>7}"
        )
    summary = {}
    for name, a, b in COMPARE:
        st, cur = res[a], res[b]
        summary[name] = {
            "speedup_wall": round(st["wall_s"] / cur["wall_s"], 2),
            "speedup_cpu": round(st["cpu_s"] / cur["cpu_s"], 2),
            "rss_ratio": round(cur["peak_rss_mb"] / st["peak_rss_mb"], 2),
            "pss_ratio": round(cur["peak_pss_mb"] / st["peak_pss_mb"], 2),
        }
        v = summary[name]
        print(
            f"{name}: curate {v['speedup_wall']}x as fast (wall), {v['speedup_cpu']}x (CPU s); "
            f"peak memory {v['rss_ratio']}x (RSS), {v['pss_ratio']}x (PSS) of ST"
        )
    summary["warm curate vs cold ST (wall)"] = round(
        res["st-cold"]["wall_s"] / res["curate-warm"]["wall_s"], 2
    )
    pairs = [
        ("overlap", "st-cold", "curate-cold"),
        ("overlap, no ceiling", "st-warm-no-ceiling", "curate-warm-no-ceiling"),
    ]
    if args.extra_fp32:
        pairs.append(("overlap, curate fp32", "st-cold", "curate-fp32"))
    for name, a, b in pairs:
        summary[name] = overlap(res[a]["negatives"], res[b]["negatives"], args.negatives)
        print(f"{name} (share of ST's negatives curate also chose): {summary[name]}")
    for r in res.values():
        r.pop("negatives")
    print(json.dumps({"summary": summary, "runs": res}))


if __name__ == "__main__":
    main()
