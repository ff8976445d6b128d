"""GPU check: curate against sentence-transformers on one GPU, one prepared script (NOT YET RUN on
a GPU: no device was lent when it was written; ``--smoke`` runs it tiny on CPU in the tests).

1. embed: ``--texts`` short texts (8-32 words drawn from the model's vocabulary, seeded) with
   curate.embed.Encoder (bf16 autocast, length-sorted token-budget batches) vs
   ``SentenceTransformer.encode`` under the same bf16 autocast, same model and max length.
2. mine: ``--queries`` queries against ``--docs`` clustered unit vectors (384 dims, generated on
   the device), top ``--k``: curate's exact torch search (``index.factory: torch-exact``, corpus
   resident in bf16) vs the torch path of sentence-transformers' ``mine_hard_negatives``
   (``model.similarity`` over query chunks then ``torch.topk``, fp32 as ``encode`` returns it,
   written out here on the same vectors, since ``mine_hard_negatives`` embeds its own texts);
   ``--docs-large`` then times curate alone on a larger corpus. faiss is not used: the lent image
   has none (the ids of both searches are compared instead).
3. train: one global batch of ``--batch`` rows (query, positive, 1 negative) with GradCache chunks
   of ``--chunk``: curate's trainer step (train.loss masks + masked InfoNCE, train.gradcache,
   bf16 autocast, fused AdamW) vs sentence-transformers' CachedMultipleNegativesRankingLoss with
   the same chunk (mini_batch_size), scale 1/t, autocast and optimizer.

Prints texts/s, queries/s, examples/s, peak GPU memory and the ratios (targets: embed >= 1.5x,
mine >= 3x, train >= 1.2x), and writes ``--out`` (JSON). Imports only torch, transformers,
sentence-transformers, numpy and pyarrow (what the lent H200 image has; no faiss, polars or
Dask): embedding runs in this process, not on Dask workers, and the output says what was absent.

    python3 benchmarks/gpu_check.py --model /path/to/all-MiniLM-L6-v2 --out gpu_check.json
    .venv/bin/python benchmarks/gpu_check.py --smoke --out /tmp/gpu_check.json   # CPU, seconds
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # curate and train from the checkout

TARGETS = {"embed": 1.5, "mine": 3.0, "train": 1.2}
FULL = dict(texts=1_000_000, queries=100_000, docs=1_000_000, docs_large=10_000_000, k=100,
            batch=4096, chunk=256, steps=3, max_length=64)  # fmt: skip
SMOKE = dict(texts=300, queries=64, docs=3_000, docs_large=6_000, k=10, batch=16, chunk=4,
             steps=1, max_length=32)  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gb(device: torch.device) -> float | None:
    return (
        round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None
    )


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def timed(fn, device: torch.device) -> tuple[object, float]:
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def amp(device: torch.device):
    from train.parallel import autocast, autocast_dtype

    return autocast(device, autocast_dtype(device))


# --- data -----------------------------------------------------------------------------------


def short_texts(vocab: list[str], n: int, seed: int, lo: int = 8, hi: int = 33) -> list[str]:
    rng = np.random.default_rng(seed)
    lens = rng.integers(lo, hi, n)
    picks = rng.integers(0, len(vocab), int(lens.sum()))
    ends = np.cumsum(lens)
    return [" ".join(vocab[i] for i in picks[e - m : e]) for e, m in zip(ends, lens)]


def vocabulary(model: Path) -> list[str]:
    from transformers import AutoTokenizer

    words = sorted(AutoTokenizer.from_pretrained(str(model)).get_vocab())
    return [w for w in words if w.isalpha() and len(w) > 2]


def clustered(n: int, dim: int, seed: int, device: torch.device, chunk: int = 1 << 20):
    """[n, dim] unit vectors around n/1000 seeded centres, made on ``device`` in chunks."""
    g = torch.Generator(device=device).manual_seed(seed)
    centres = torch.randn(max(1, n // 1000), dim, generator=g, device=device)
    out = torch.empty(n, dim, device=device)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        pick = torch.randint(0, len(centres), (m,), generator=g, device=device)
        x = centres[pick] + 0.5 * torch.randn(m, dim, generator=g, device=device)
        out[s : s + m] = torch.nn.functional.normalize(x, dim=1)
    return out


def tiny_model(root: Path) -> Path:
    """Smoke: a 2-layer random BERT with MiniLM's tokenizer (the packaged model's files)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from curate.embed.encoder import resolve_model

    tok = AutoTokenizer.from_pretrained(str(resolve_model("all-MiniLM-L6-v2")))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64)  # fmt: skip
    BertModel(cfg).save_pretrained(root)
    tok.save_pretrained(root)
    return root


# --- 1. embed ---------------------------------------------------------------------------------


def embed_check(model: Path, texts: list[str], device: torch.device, max_length: int) -> dict:
    from sentence_transformers import SentenceTransformer

    from curate.config import EmbedConfig
    from curate.embed.encoder import Encoder

    dtype = "auto" if device.type == "cuda" else "float32"  # auto on CUDA: bf16 autocast
    budget = 1 << 18 if device.type == "cuda" else 8192
    cfg = EmbedConfig(dtype=dtype, device=device.type, max_length=max_length, token_budget=budget)
    enc = Encoder.load(cfg, model)
    enc.encode(texts[:256])  # warm-up
    reset_peak(device)
    _, curate_s = timed(lambda: enc.encode(texts), device)
    curate_mem = peak_gb(device)
    enc = None  # its model's memory back before ST loads

    st = SentenceTransformer(str(model), device=str(device))
    st.max_seq_length = max_length
    batch = 512 if device.type == "cuda" else 32

    def st_encode(xs):
        with torch.inference_mode(), amp(device):
            return st.encode(xs, batch_size=batch, normalize_embeddings=True, convert_to_numpy=True)

    st_encode(texts[:256])
    reset_peak(device)
    _, st_s = timed(lambda: st_encode(texts), device)
    res = {
        "texts": len(texts), "dtype": "bf16 autocast" if device.type == "cuda" else "fp32",
        "curate_texts_per_s": round(len(texts) / curate_s, 1), "curate_peak_gpu_gb": curate_mem,
        "st_texts_per_s": round(len(texts) / st_s, 1), "st_peak_gpu_gb": peak_gb(device),
        "st_batch_size": batch, "ratio": round(st_s / curate_s, 3),
        "how": "curate.embed.encoder.Encoder in this process "
               "(the pipeline maps it over Dask workers)",
    }  # fmt: skip
    print("embed:", res, flush=True)
    return res


# --- 2. mine ----------------------------------------------------------------------------------


def st_torch_search(q: torch.Tensor, corpus: torch.Tensor, k: int, chunk: int):
    """mine_hard_negatives(use_faiss=False)'s search: model.similarity (cos_sim) per query chunk
    against the whole corpus, then torch.topk."""
    from sentence_transformers.util import cos_sim

    parts = [
        torch.topk(cos_sim(q[s : s + chunk], corpus), k, dim=1) for s in range(0, len(q), chunk)
    ]
    return torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts])


def mine_check(n_docs: int, n_large: int, n_queries: int, k: int, device: torch.device) -> dict:
    from curate.index.exact import ExactSearch

    docs = clustered(n_docs, 384, 0, device)
    queries = clustered(n_queries, 384, 1, device).cpu().numpy()
    reset_peak(device)
    search = ExactSearch(docs, device)
    search.search(queries[:256], k)  # warm-up
    (_, ids), curate_s = timed(lambda: search.search(queries, k), device)
    curate_mem = peak_gb(device)
    search = None  # the bf16 copy of the corpus

    # ST's default query chunk (faiss_batch_size 16384) holds a [16384, N] fp32 matrix: cut to
    # ~16 GB of scores so 1M docs fit beside the corpus.
    chunk = max(1, min(16384, (16 << 30) // (4 * n_docs)))
    qt = torch.from_numpy(queries).to(device)
    st_torch_search(qt[:256], docs, k, chunk)
    reset_peak(device)
    (_, st_ids), st_s = timed(lambda: st_torch_search(qt, docs, k, chunk), device)
    same = float((st_ids.cpu().numpy()[:, :10] == ids[:, :10]).mean())
    res = {
        "docs": n_docs, "queries": n_queries, "k": k,
        "curate_queries_per_s": round(n_queries / curate_s, 1), "curate_peak_gpu_gb": curate_mem,
        "st_queries_per_s": round(n_queries / st_s, 1), "st_peak_gpu_gb": peak_gb(device),
        "st_query_chunk": chunk, "ratio": round(st_s / curate_s, 3),
        "top10_ids_equal_share": round(same, 4),
        "how": "curate.index.exact.ExactSearch (bf16 on CUDA) vs ST's torch path (fp32)",
    }  # fmt: skip
    docs = qt = None
    reset_peak(device)
    big = ExactSearch(clustered(n_large, 384, 2, device), device)
    _, big_s = timed(lambda: big.search(queries, k), device)
    res.update(large_docs=n_large, large_queries_per_s=round(n_queries / big_s, 1),
               large_peak_gpu_gb=peak_gb(device))  # fmt: skip
    print("mine:", res, flush=True)
    return res


# --- 3. train ---------------------------------------------------------------------------------


def batch_texts(vocab: list[str], rows: int) -> list[list[str]]:
    """[queries, positives, negatives], rows each."""
    return [
        short_texts(vocab, rows, 10, 6, 16),
        short_texts(vocab, rows, 11),
        short_texts(vocab, rows, 12),
    ]


def curate_step(model_path: Path, device: torch.device, max_length: int, chunk: int):
    """The trainer's step without its Parquet reader (which needs polars): mask from column ids
    (train.loss.build_mask), masked InfoNCE, GradCache, clip, fused AdamW."""
    from transformers import AutoModel, AutoTokenizer

    from curate.embed.encoder import pool
    from train.gradcache import gradcache_backward
    from train.loss import build_mask, info_nce

    tok = AutoTokenizer.from_pretrained(str(model_path))
    # fp32 master weights whatever the folder stores (a bf16/fp16 copy travels in half the bytes)
    model = AutoModel.from_pretrained(str(model_path)).float().to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01, fused=True)

    def encode(inputs):
        with amp(device):
            hidden = model(**inputs).last_hidden_state
        return pool(hidden.float(), inputs["attention_mask"], "mean")

    def inputs(texts):
        out = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return {k: v.to(device) for k, v in out.items()}

    def step(batch: list[list[str]]) -> float:
        qs, pos, neg = batch
        col_ids = [f"p{i}" for i in range(len(qs))] + [f"n{i}" for i in range(len(qs))]
        mask = build_mask(col_ids, [{c} for c in col_ids[: len(qs)]], len(qs)).to(device)
        loss = gradcache_backward(encode, encode, inputs(qs), inputs(pos + neg),
                                  lambda q, d: info_nce(q, d, mask, 0.05), chunk)  # fmt: skip
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step


def on(device: torch.device, features: dict) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}


def st_step(model_path: Path, device: torch.device, max_length: int, chunk: int):
    from sentence_transformers import SentenceTransformer

    try:  # sentence-transformers >= 6.2; the lent image's 6.0 has the older path only
        from sentence_transformers.sentence_transformer.losses import (
            CachedMultipleNegativesRankingLoss,
        )
    except ImportError:
        from sentence_transformers.losses import CachedMultipleNegativesRankingLoss

    st = SentenceTransformer(str(model_path), device=str(device)).float()
    st.max_seq_length = max_length
    loss_fn = CachedMultipleNegativesRankingLoss(st, scale=1 / 0.05, mini_batch_size=chunk)
    opt = torch.optim.AdamW(st.parameters(), lr=2e-5, weight_decay=0.01, fused=True)
    st.train()
    prepare = getattr(st, "preprocess", None) or st.tokenize  # renamed in sentence-transformers 6

    def step(batch: list[list[str]]) -> float:
        feats = [on(device, prepare(texts)) for texts in batch]
        with amp(device):  # the cached loss re-embeds inside backward: keep both under autocast
            loss = loss_fn(feats, None)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(st.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def train_check(model: Path, vocab: list[str], rows: int, chunk: int, steps: int,
                device: torch.device, max_length: int) -> dict:  # fmt: skip
    batch = batch_texts(vocab, rows)
    res = {"rows": rows, "columns": 2 * rows, "chunk": chunk, "steps": steps}
    for side, make in (("curate", curate_step), ("st", st_step)):
        step = make(model, device, max_length, chunk)
        step(batch)  # warm-up (kernels, allocator, fused AdamW state)
        reset_peak(device)
        losses, s = timed(lambda step=step: [step(batch) for _ in range(steps)], device)
        res[f"{side}_examples_per_s"] = round(rows * steps / s, 2)
        res[f"{side}_peak_gpu_gb"] = peak_gb(device)
        res[f"{side}_loss"] = round(losses[-1], 4)
        step = None  # model and optimizer state freed before the other side
        reset_peak(device)
    res["ratio"] = round(res["curate_examples_per_s"] / res["st_examples_per_s"], 3)
    res["how"] = "curate: trainer step without the Parquet reader; ST: CachedMNRL, same chunk"
    print("train:", res, flush=True)
    return res


# --- main -------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    absent = [
        m for m in ("faiss", "polars", "dask", "distributed") if not importlib.util.find_spec(m)
    ]
    env = {
        "torch": torch.__version__, "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "absent": absent,
        "degraded": ["search: curate's torch exact search (no faiss needed)",
                     "embed: one process in place of Dask workers"],
    }  # fmt: skip
    print("environment:", env, flush=True)
    return env


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="everything tiny on CPU, seconds")
    ap.add_argument("--model", type=Path, help="model folder (default: packaged all-MiniLM-L6-v2)")
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--skip", nargs="*", default=[], choices=["embed", "mine", "train"])
    for key, val in FULL.items():
        ap.add_argument(
            f"--{key.replace('_', '-')}", type=int, help=f"default {val} (smoke: {SMOKE[key]})"
        )
    args = ap.parse_args(argv)
    sizes = {k: getattr(args, k) or (SMOKE if args.smoke else FULL)[k] for k in FULL}
    cuda = torch.cuda.is_available() and args.device != "cpu" and not args.smoke
    if args.device == "cuda" and not cuda:
        sys.exit("gpu_check: --device cuda but torch sees no CUDA device")
    device = torch.device("cuda" if cuda else "cpu")
    out = {"environment": environment(device), "sizes": sizes, "smoke": args.smoke}
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or (tiny_model(Path(tmp)) if args.smoke else None)
        if model is None:
            from curate.embed.encoder import resolve_model

            model = resolve_model("all-MiniLM-L6-v2")
        vocab = vocabulary(Path(model))
        if "embed" not in args.skip:
            texts = short_texts(vocab, sizes["texts"], 0)
            out["embed"] = embed_check(Path(model), texts, device, sizes["max_length"])
        if "mine" not in args.skip:
            out["mine"] = mine_check(sizes["docs"], sizes["docs_large"], sizes["queries"],
                                     sizes["k"], device)  # fmt: skip
        if "train" not in args.skip:
            out["train"] = train_check(Path(model), vocab, sizes["batch"], sizes["chunk"],
                                       sizes["steps"], device, sizes["max_length"])  # fmt: skip
    out["ratios"] = {k: out[k]["ratio"] for k in TARGETS if k in out}
    out["targets_met"] = {k: r >= TARGETS[k] for k, r in out["ratios"].items()}
    print(
        "ratios (curate / sentence-transformers):", out["ratios"], "targets:", TARGETS, flush=True
    )
    args.out.write_text(json.dumps(out, indent=1))
    print("wrote", args.out, flush=True)
    return out


if __name__ == "__main__":
    main()
