"""A compact trainer for embedding models on curate's shards, read top to bottom.

Each step takes one batch (one Parquet row group) in shard order and minimises masked InfoNCE
over [the batch's positives + all of its mined negatives]: for query i, a column is removed from
the softmax denominator when its document is a known positive of i (other than i's own positive),
was rejected for i as a likely false negative while mining (forbidden pairs), or repeats an
earlier column. With ``chunk_size`` > 0 the batch is embedded with GradCache, so the batch size is
bounded by the loss, not by activation memory.

Checkpoints hold model, optimizer, scheduler, step and RNG states; a rerun resumes from the last
one and continues with exactly the batch that would have come next.

Device and data-parallel ranks (``train.device``, ``train.processes`` or torchrun): every rank
reads the whole batch, embeds its slice of the rows and computes the loss over the all-gathered
global batch; ``train/parallel.py`` says how, and why the gradient sum is exact.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import polars as pl
import torch

from curate.batch.shards import iter_batches, read_manifest
from curate.config import EmbedConfig, TrainConfig
from curate.embed.encoder import pool, pretrained
from curate.files import atomic_dir
from curate.progress import track
from train import parallel
from train.gradcache import gradcache_backward, plain_backward
from train.loss import (
    LearnableTemperature,
    build_mask,
    distill_kl,
    distill_mse,
    info_nce,
    masked_fraction,
    mean_candidates,
    mi_lower_bound,
    multi_positive_masks,
)

log = logging.getLogger(__name__)


# --- data ---------------------------------------------------------------------------------


def load_forbidden(shard_dir: Path) -> dict[str, set[str]]:
    """query_id -> doc ids rejected for it as likely false negatives while mining."""
    rec = read_manifest(shard_dir).get("forbidden")
    if not rec:
        return {}
    path = shard_dir / rec["path"]
    out: dict[str, set[str]] = {}
    for q, d in pl.read_parquet(path).select("query_id", "doc_id").iter_rows():
        out.setdefault(q, set()).add(d)
    return out


def batch_columns(rows: pl.DataFrame, forbidden: dict[str, set[str]]):
    """-> (query texts [B], doc texts [C], doc ids [C], known positives per row, forbidden per row).
    Columns are the B positives in row order, then every row's negatives in row order."""
    col_ids = rows["pos_id"].to_list() + [d for ids in rows["neg_ids"] for d in ids]
    col_text = rows["pos"].to_list() + [t for ts in rows["negs"] for t in ts]
    known = [set(kp) for kp in rows["known_pos_ids"].to_list()]
    rejected = [forbidden.get(q, set()) for q in rows["query_id"].to_list()]
    return rows["query"].to_list(), col_text, col_ids, known, rejected


def batch_masks(cfg: TrainConfig, col_ids, known, rejected):
    """-> (mask [B, C], positives [B, C] or None). Forbidden docs are always masked; known
    positives are masked, or are targets under the multi-positive loss. ``cfg.mask`` false (an
    ablation) drops both: only repeated columns stay masked."""
    if not cfg.mask:
        known, rejected = [set() for _ in known], None
    if cfg.loss == "multi_positive":
        return multi_positive_masks(col_ids, known, len(known), rejected)
    return build_mask(col_ids, known, len(known), rejected), None


def own_columns(rows: pl.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
    """Column numbers of each row's [positive, own negatives] ->
    (index [B, 1+n], valid [B, 1+n])."""
    counts = [len(n) for n in rows["neg_ids"].to_list()]
    width, B = 1 + max(counts, default=0), len(counts)
    index = torch.zeros(B, width, dtype=torch.long)
    valid = torch.zeros(B, width, dtype=torch.bool)
    start = B
    for i, n in enumerate(counts):
        index[i, 0], valid[i, : 1 + n] = i, True
        index[i, 1 : 1 + n] = torch.arange(start, start + n)
        start += n
    return index, valid


def teacher_scores(rows: pl.DataFrame, width: int) -> torch.Tensor:
    """[B, 1+n] of the shards' pos_score / neg_scores, zero-padded."""
    out = torch.zeros(rows.height, width)
    for i, (p, negs) in enumerate(zip(rows["pos_score"].to_list(), rows["neg_scores"].to_list())):
        out[i, 0] = p
        out[i, 1 : 1 + len(negs)] = torch.tensor(negs, dtype=torch.float32)
    return out


# --- model --------------------------------------------------------------------------------


def encoder(model, pooling: str = "mean", device=None, amp: torch.dtype | None = None):
    """texts' inputs -> [n, D] fp32 unit vectors; the model runs under autocast when ``amp``."""

    def encode(inputs: dict) -> torch.Tensor:
        with parallel.autocast(device or torch.device("cpu"), amp):
            hidden = model(**inputs).last_hidden_state  # [n, L, D], bf16 under autocast
        # Pool and normalise in fp32: the loss divides cosines by t ~ 0.05, bf16 has 8 bits.
        return pool(hidden.float(), inputs["attention_mask"], pooling)  # [n, D]

    return encode


def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:  # linear warmup, then linear decay to 0
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


# --- checkpoints --------------------------------------------------------------------------


def _rng_state() -> dict:
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def save_checkpoint(
    ckpt_dir: Path, step: int, model, opt, sched, temp, world=parallel.SINGLE, scaler=None
) -> None:
    """Written to a temp folder and renamed, so a crash never leaves a half checkpoint. Every
    rank calls it (its RNG state is gathered); rank 0 writes, the others wait until it is done."""
    rngs = parallel.gather_objects(_rng_state(), world)
    if world.main:
        final = ckpt_dir / f"step-{step:08d}"
        state = {
            "step": step,
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "sched": sched.state_dict(),
            "rng": rngs[0]["cpu"],
            "rngs": rngs,  # one per rank: each resumes its own dropout stream
            "temp": temp.state_dict() if isinstance(temp, torch.nn.Module) else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
        }
        with atomic_dir(final, ckpt_dir / f".step-{step:08d}.tmp") as tmp:
            torch.save(state, tmp / "state.pt")
        for old in sorted(ckpt_dir.glob("step-*"))[:-2]:  # keep the last two
            shutil.rmtree(old, ignore_errors=True)
    parallel.barrier(world)


def load_checkpoint(ckpt: Path, model, opt, sched, temp, world=parallel.SINGLE, scaler=None) -> int:
    """Restore a checkpoint saved on any device into objects on this one -> its step.

    Read onto the CPU (map_location): the RNG states must be CPU tensors, and load_state_dict
    copies weights and optimizer moments onto the parameters' device, GPU or not."""
    # Tensors, numbers, lists and dicts only: the restricted unpickler runs no code.
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    rngs = state.get("rngs") or [{"cpu": state["rng"], "cuda": None}]
    if len(rngs) == world.size:
        torch.set_rng_state(rngs[world.rank]["cpu"])
        if rngs[world.rank]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rngs[world.rank]["cuda"])
    else:  # weights and batch order still resume exactly; dropout masks cannot
        log.warning("%s was saved by %d processes, resuming with %d: RNG streams restart",
                    ckpt.name, len(rngs), world.size)  # fmt: skip
    if state["temp"] is not None:
        temp.load_state_dict(state["temp"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return state["step"]


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    done = sorted(ckpt_dir.glob("step-*"))
    return done[-1] if done else None


ST_FILES = (
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling",
    "2_Normalize",
)


def save_model(model, source: Path, path: Path) -> None:
    """save_pretrained layout plus the base's sentence-transformers files, so the result loads
    in transformers and sentence-transformers alike. The tokenizer is re-read from ``source``:
    one that has tokenized with padding/truncation serialises that state, which would make two
    saves of the same weights differ."""
    from transformers import AutoTokenizer

    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(str(source), local_files_only=True).save_pretrained(tmp)
        for name in ST_FILES:
            src = Path(source) / name
            if src.is_dir():
                shutil.copytree(src, tmp / name)
            elif src.is_file():
                shutil.copy2(src, tmp / name)


# --- the loop -----------------------------------------------------------------------------


def train(
    shard_dir: Path,
    out_dir: Path,
    model_path: Path,
    cfg: TrainConfig,
    embed_cfg: EmbedConfig,
    seed: int = 0,
) -> Path:
    world = parallel.world_from_env()
    if cfg.processes > 1 and world.size == 1:  # launch the ranks; each re-enters here
        parallel.spawn(train, cfg.processes, (shard_dir, out_dir, model_path, cfg, embed_cfg, seed))
        return Path(out_dir) / "final"
    device = parallel.resolve_device(cfg.device, world)
    parallel.init(world, device)
    amp = parallel.autocast_dtype(device)
    scaler = parallel.grad_scaler(amp)
    if world.main:
        log.info("train on %s (%s), %d process(es)", device, amp or torch.float32, world.size)
    torch.manual_seed(seed + world.rank)  # each rank draws its own dropout masks
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world.size))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    out_dir, shard_dir = Path(out_dir), Path(shard_dir)
    ckpt_dir = out_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(model_path, embed_cfg, device, world)
    n_batches = sum(f["batches"] for f in read_manifest(shard_dir)["files"])
    total = min(cfg.max_steps or math.inf, cfg.epochs * n_batches)
    forbidden = load_forbidden(shard_dir)

    temp = LearnableTemperature(cfg.temperature) if cfg.learn_temperature else cfg.temperature
    if cfg.learn_temperature:
        temp.to(device)
    params = list(model.parameters())
    opt = make_optimizer(cfg, params, temp)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, int(total)))

    step = 0
    if (ckpt := latest_checkpoint(ckpt_dir)) is not None:
        step = load_checkpoint(ckpt, model, opt, sched, temp, world, scaler)
        log.info("resumed from %s at step %d", ckpt.name, step)

    stepper = Stepper(cfg, encoder(model, device=device, amp=amp), tokenizer, temp, world,
                      device, forbidden, scaler)  # fmt: skip
    log_path = out_dir / "train_log.jsonl"
    steps = range(step, int(total))
    bar = track(steps, total=int(total), desc="train") if world.main else steps
    batches = _batch_stream(shard_dir, step, n_batches)
    for step in bar:
        rows = pl.from_arrow(next(batches))
        t0 = time.perf_counter()
        loss, mask, n_cols = stepper.backward(rows, step % n_batches)
        parallel.all_reduce_grads(params, world)  # sum over ranks = the whole batch's gradient
        if cfg.learn_temperature:  # every rank computed the full dL/dt: identical, keep one
            parallel.all_reduce_grads(list(temp.parameters()), world, average=True)
        if scaler is not None:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if cfg.learn_temperature:
            temp.clamp_()

        rec = {
            "step": step + 1,
            "loss": round(float(loss), 5),
            "mi_bound": round(mi_lower_bound(loss, mean_candidates(mask, n_cols)), 5),
            "temperature": round(float(temp().detach() if callable(temp) else temp), 5),
            "masked_fraction": round(masked_fraction(mask), 5),
            "rows": rows.height,
            "columns": n_cols,
            "examples_per_s": round(rows.height / (time.perf_counter() - t0), 2),
            "lr": sched.get_last_lr()[0],
        }
        if world.main:
            with open(log_path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
        if (step + 1) % cfg.checkpoint_every == 0:
            save_checkpoint(ckpt_dir, step + 1, model, opt, sched, temp, world, scaler)
    save_checkpoint(ckpt_dir, int(total), model, opt, sched, temp, world, scaler)
    final = out_dir / "final"
    model.eval()
    if world.main:
        save_model(model, Path(model_path), final)
    parallel.barrier(world)
    return final


def load_model(model_path: Path, embed_cfg: EmbedConfig, device, world):
    """(model on ``device`` in train mode, tokenizer); under several ranks rank 0's weights."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = pretrained(AutoTokenizer, model_path, embed_cfg.trust_remote_code)
    model = pretrained(AutoModel, model_path, embed_cfg.trust_remote_code).to(device)
    parallel.broadcast_params(model, world)
    model.train()
    return model, tokenizer


def make_optimizer(cfg: TrainConfig, params: list, temp) -> torch.optim.AdamW:
    groups = [{"params": params, "weight_decay": cfg.weight_decay}]
    if cfg.learn_temperature:  # no decay on log t: decay would pull t towards 1
        groups.append({"params": list(temp.parameters()), "weight_decay": 0.0})
    # Fused AdamW: one kernel over all tensors, 11x faster than the per-tensor loop on this CPU
    # (1.6 s -> 0.15 s a step for MiniLM's 22M weights: 14% of a batch-16 step; docs/training.md),
    # and the usual choice on CUDA.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused)


@dataclass
class Stepper:
    """One batch's forward and backward on this rank: loss over the global batch, gradient
    for this rank's rows (``parallel.all_reduce_grads`` sums the ranks' parts)."""

    cfg: TrainConfig
    encode: Callable
    tokenizer: object
    temp: object
    world: parallel.World
    device: torch.device
    forbidden: dict
    scaler: object = None

    def tok(self, texts: list[str]) -> dict:
        inputs = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.cfg.max_length,
            return_tensors="pt",
        )  # fmt: skip
        return {k: v.to(self.device) for k, v in inputs.items()}

    def backward(self, rows: pl.DataFrame, batch: int | None = None):
        """-> (detached loss, global mask [B, C], C); grads accumulated into the parameters."""
        _, docs, col_ids, known, rejected = batch_columns(rows, self.forbidden)
        mask, positives = batch_masks(self.cfg, col_ids, known, rejected)  # [B, C]
        loss_fn = make_loss(self.cfg, self.temp, mask, positives, rows, self.device)
        my_q, my_d, sizes = parallel.local_texts(rows, self.world, batch)
        scale = self.scaler.scale if self.scaler is not None else (lambda x: x)

        def global_loss(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
            # q [b, D], d [b + n, D] (this rank) -> [B, D], [C, D] (the batch)
            return scale(loss_fn(*parallel.gather_columns(q, d, sizes, self.world)))

        backward = gradcache_backward if self.cfg.chunk_size else plain_backward
        loss = backward(self.encode, self.encode, self.tok(my_q), self.tok(my_d), global_loss,
                        self.cfg.chunk_size)  # fmt: skip
        if self.scaler is not None:
            loss = loss / self.scaler.get_scale()
        return loss, mask, len(docs)


def make_loss(cfg: TrainConfig, temp, mask, positives, rows: pl.DataFrame, device=None):
    """The batch's loss as a function of the embeddings q [B, D], d [C, D] (what GradCache
    needs)."""
    index, valid = own_columns(rows) if cfg.distill != "none" else (None, None)
    teacher = teacher_scores(rows, index.shape[1]) if index is not None else None
    if device is not None:  # masks and teacher scores beside the embeddings
        mask = mask.to(device)
        positives = positives.to(device) if positives is not None else None
        if index is not None:
            index, valid, teacher = index.to(device), valid.to(device), teacher.to(device)

    def loss_fn(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        t = temp() if callable(temp) else temp
        loss = info_nce(
            q,
            d,
            mask,
            t,
            symmetric=cfg.symmetric,
            decoupled=cfg.loss == "decoupled",
            positives=positives,
        )
        if teacher is not None:
            cos = torch.einsum("bd,bkd->bk", q, d[index])  # [B, 1+n] student cosines
            if cfg.distill == "kl":
                extra = distill_kl(cos / t, teacher, cfg.teacher_temperature, valid)
            else:
                extra = distill_mse(cos, teacher, valid)
            loss = loss + cfg.distill_weight * extra
        return loss

    return loss_fn


def _batch_stream(shard_dir: Path, step: int, n_batches: int):
    """Batches in shard order, epoch after epoch, starting at global step ``step``."""
    start = step % n_batches
    while True:
        for _, table in iter_batches(shard_dir, start):
            yield table
        start = 0


# --- entry points under torchrun ------------------------------------------------------------

STAGES_WAIT = timedelta(hours=6)  # how long ranks > 0 of `curate train` wait for rank 0's stages


def follow_run(cfg) -> Path:
    """A torchrun rank other than 0 under ``curate train``/``run``: rank 0 runs the stages before
    training (and evaluation after), this rank joins it for training only. It waits in the
    process group's rendezvous, which rank 0 enters once its shards are written."""
    from curate.embed.encoder import resolve_model

    world = parallel.world_from_env()
    parallel.init(world, parallel.resolve_device(cfg.train.device, world), STAGES_WAIT)
    out = Path(cfg.output_dir)  # the paths pipelines.stages.train_stage trains with
    return train(out / "shards", out / "model", resolve_model(cfg.embed.model), cfg.train,
                 cfg.embed, cfg.seed)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """``torchrun --nproc-per-node N -m train.train CONFIG [--set KEY=VALUE]``: train on the
    shards of a run already batched (``curate batch CONFIG``), every rank alike."""
    import argparse

    from curate.config import load_config
    from curate.embed.encoder import resolve_model

    parser = argparse.ArgumentParser(prog="python -m train.train", description=main.__doc__)
    parser.add_argument("config", nargs="?", help="YAML config of the run (default: built-in)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    cfg = load_config(args.config, args.set)
    out = Path(cfg.output_dir)
    final = train(out / "shards", out / "model", resolve_model(cfg.embed.model), cfg.train,
                  cfg.embed, cfg.seed)  # fmt: skip
    if parallel.world_from_env().main:
        print(f"model:    {final}")


if __name__ == "__main__":
    main()
