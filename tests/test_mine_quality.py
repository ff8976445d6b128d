"""Mining quality on Cranfield: the n-gram near-duplicate rule on real texts, the mining-quality
report, and a pipeline run (tiny BERT, IVF index, tiny cross-encoder as fncheck scorer and
teacher) checked for partition independence, its manifest sections and the trainer's mask of a
planted false negative."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from curate.batch.shards import read_manifest
from curate.config import MineConfig, TrainConfig, config_from_dict
from curate.mine.fncheck import mining_quality
from curate.mine.negatives import (
    PairBlock,
    _ngram_duplicates,
    load_doc_texts,
    mine_block,
    write_doc_texts,
)
from curate.mine.scorer import load
from curate.text import ngram_overlap, ngrams, normalise
from pipelines.run import run
from train.train import batch_columns, batch_masks, load_forbidden

# --- the n-gram rule ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def texts_file(cranfield, tmp_path_factory) -> tuple[Path, list[str]]:
    """d0: a Cranfield doc (the positive); d1: d0 with its last tenth replaced (a near copy);
    d2..d4: other Cranfield docs."""
    docs = [json.loads(line)["text"] for line in (cranfield / "corpus.jsonl").open()][:8]
    words = docs[0].split()
    near = " ".join(words[: int(0.9 * len(words))] + docs[5].split()[:5])
    texts = [docs[0], near, docs[2], docs[3], docs[4]]
    path = tmp_path_factory.mktemp("texts") / "doc_texts.arrow"
    write_doc_texts(path, texts)
    return path, texts


def block(path, known=(0,)) -> PairBlock:
    return PairBlock(
        query_ids=["q0"],
        query_vecs=np.eye(8, dtype=np.float32)[[0]],
        pair_query=np.array([0]),
        pair_pos=np.array([0]),
        known=[np.array(known)],
        pos_ids=["d0"],
        doc_texts=None if path is None else str(path),
    )


HITS = (np.array([[0.7, 0.6, 0.5, 0.4]], np.float32), np.array([[1, 2, 3, 4]]))


def mine(path, known=(0,), **kw):
    """Vectors orthogonal (no cosine rule fires), unique hashes: only the n-gram rule can."""
    cfg = MineConfig(num_negatives=10, max_relative=None, **kw)
    docs, hashes = np.eye(8, dtype=np.float32), np.arange(8, dtype=np.uint64)
    return mine_block(block(path, known), *HITS, docs, hashes, cfg, seed=0)


def test_near_copy_of_the_positive_is_an_ngram_duplicate(texts_file):
    path, texts = texts_file
    overlap = ngram_overlap(texts[1], texts[0])
    assert overlap > 0.5 and max(ngram_overlap(t, texts[0]) for t in texts[2:]) < 0.1
    res = mine(path, ngram_threshold=0.5)
    assert res.neg_docs[0].tolist() == [2, 3, 4]
    assert res.funnel == {"candidates": 4, "ngram_duplicate": 1, "kept": 3}
    assert res.forbidden == [(0, 1, "ngram_duplicate")]
    assert res.forbidden_scores == pytest.approx([0.7])
    # The threshold is compared with curate.text.ngram_overlap's Jaccard.
    assert mine(path, ngram_threshold=overlap - 1e-6).funnel["ngram_duplicate"] == 1
    assert mine(path, ngram_threshold=overlap).funnel["ngram_duplicate"] == 0


def test_ngram_rule_off_by_none_or_without_texts(texts_file):
    path, _ = texts_file
    for res in (mine(path, ngram_threshold=None), mine(None, ngram_threshold=0.5)):
        assert res.neg_docs[0].tolist() == [1, 2, 3, 4] and res.forbidden == []


def test_ngram_rule_sees_only_survivors_of_the_earlier_rules(texts_file):
    path, _ = texts_file
    res = mine(path, known=(0, 1), ngram_threshold=0.5)  # d1 is itself a known positive
    assert res.forbidden == [(0, 1, "known_positive")]
    res = mine(path, range_min=1, ngram_threshold=0.5)  # d1 is at rank 0: out of the window
    assert res.funnel == {"candidates": 4, "out_of_window": 1, "kept": 3}


def test_ngram_join_matches_pairwise_jaccard(cranfield, tmp_path):
    """The sort-merge join over hashed n-grams decides as ngram_overlap does pair by pair, with
    several known positives, repeated n-grams across positives and near-threshold pairs."""
    docs = [json.loads(line)["text"] for line in (cranfield / "corpus.jsonl").open()][:60]
    rng = np.random.default_rng(0)
    for i in range(0, 60, 3):  # near copies at several overlaps, so every threshold is crossed
        words = docs[i].split()
        keep = int(len(words) * rng.uniform(0.3, 1.0))
        docs.append(" ".join(words[:keep] + docs[i + 1].split()[: len(words) - keep]))
    path = tmp_path / "texts.arrow"
    write_doc_texts(path, docs)
    texts = load_doc_texts(str(path))
    for trial in range(30):
        known = rng.choice(len(docs), rng.integers(1, 6), replace=False)
        cand = rng.choice(len(docs), 25, replace=False)
        threshold = float(rng.choice([0.1, 0.3, 0.5, 0.7]))
        want = [max(ngram_overlap(docs[c], docs[k]) for k in known) > threshold for c in cand]
        got = _ngram_duplicates(cand, known, texts, threshold, {})
        assert got.tolist() == want, trial


@given(st.text(alphabet=st.sampled_from("ab é É ß ﬁ ② _-.,\t\n\x1c\u00a0\u2003'"), max_size=40))
def test_normalise_and_ngrams_keep_their_definition(text):
    """normalise and ngrams share one word split; it must give what the definition does:
    NFKC, case-fold, every non-word non-space character to a space, whitespace collapsed."""
    import re
    import unicodedata

    folded = unicodedata.normalize("NFKC", text).casefold()
    reference = re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", folded)).strip()
    assert normalise(text) == reference
    ws = reference.split()
    assert ngrams(text) == {" ".join(ws[i : i + 3]) for i in range(max(1, len(ws) - 2))}


# --- the report ---------------------------------------------------------------------------


def test_mining_quality_figures():
    mined = pl.DataFrame(
        {"pos_score": [0.8, 0.6, 0.5], "neg_scores": [[0.5, 0.7], [0.2], []]},
        schema={"pos_score": pl.Float64, "neg_scores": pl.List(pl.Float64)},
    )
    funnel = Counter(candidates=10, kept=3, known_positive=2, ngram_duplicate=1, not_selected=4)
    q = mining_quality(mined, funnel, {"checked": 4, "confirmed": 1})
    assert q["gap_pos_minus_hardest_neg"] == {"mean": 0.25, "median": 0.25}
    assert q["pairs"] == 3 and q["pairs_without_negatives"] == 1
    assert q["skip_rates"] == {"known_positive": 0.2, "ngram_duplicate": 0.1, "not_selected": 0.4}
    assert q["kept_rate"] == 0.3
    assert q["est_false_negative_rate"] == 0.25
    assert mining_quality(mined, funnel, None)["est_false_negative_rate"] is None


# --- the pipeline -------------------------------------------------------------------------


def _config(out: Path, cache: Path, data: Path, model: Path, scorer: Path, parts: int) -> dict:
    return {
        "output_dir": str(out),
        "cache_dir": str(cache),
        "seed": 5,
        "data": {"path": str(data), "empty_text": "skip", "max_train_queries": 30},
        "embed": {"model": str(model), "max_length": 64, "partition_size": 700},
        # 8 lists probed one at a time: the guard must raise nprobe to reach the floor.
        "index": {"factory": "IVF8,Flat", "nprobe": 1, "recall_action": "raise_nprobe",
                  "recall_sample": 50},
        # The random tiny BERT puts all texts close together: loosen the score-based filters.
        "mine": {"top_k": 30, "num_negatives": 3, "range_max": 30, "max_relative": None,
                 # query_partition: queries per partition
                 "near_dup_threshold": 0.99999, "query_partition": 30 // parts},
        "fncheck": {"scorer": str(scorer), "band": [0.85, 1.2], "max_length": 64},
        "teacher": {"scorer": str(scorer), "max_length": 64},
        "batch": {"batch_size": 8, "batches_per_shard": 4},
        "train": {"enabled": False},
        "eval": {"enabled": False},
        "cluster": {"n_workers": 2, "threads_per_worker": 1},
    }  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cranfield, tiny_model, tiny_cross_encoder):
    """The same run with the training queries mined as 1 partition and as 3."""
    cache = tmp_path_factory.mktemp("cache")
    out = {}
    for parts in (1, 3):
        folder = tmp_path_factory.mktemp(f"parts-{parts}")
        cfg = _config(folder, cache, cranfield, tiny_model, tiny_cross_encoder, parts)
        out[parts] = folder, run(config_from_dict(cfg), quiet=True)
    return out


def _outputs(out: Path) -> dict:
    files = sorted((out / "shards").glob("*.parquet")) + [out / "forbidden.parquet"]
    got = {p.name: p.read_bytes() for p in files}
    manifest = read_manifest(out / "shards")
    manifest["config"].pop("output_dir")
    manifest["config"]["mine"].pop("query_partition")
    return got | {"manifest": manifest}


def test_query_partitions_do_not_change_the_shards(runs):
    (one, _), (three, _) = runs[1], runs[3]
    assert len(list((three / "work" / "mined").glob("*.forbidden.parquet"))) == 3
    assert _outputs(one) == _outputs(three)


def test_manifest_sections(runs):
    out, result = runs[1]
    m = read_manifest(out / "shards")
    assert set(result["manifest"]) >= {"fncheck", "mining_quality", "score_source", "index_recall"}
    rec = m["index_recall"]
    assert not rec["exact"] and rec["attempts"][0]["nprobe"] == 1
    assert rec["recall"] >= 0.95 and rec["nprobe"] == rec["attempts"][-1]["nprobe"] > 1
    funnel, q, fc = m["funnel"], m["mining_quality"], m["fncheck"]
    assert funnel["candidates"] == sum(v for k, v in funnel.items() if k != "candidates")
    assert funnel.get("confirmed_false_negative", 0) == fc["negatives_removed"]
    # Mining quality is measured as mined: its skip rates are of the mining funnel, before
    # stage 5 carries the funnel on to the shards.
    mined = m["mining_funnel"]
    assert q["skip_rates"] == {
        k: round(v / mined["candidates"], 5)
        for k, v in mined.items()
        if k not in ("candidates", "kept")
    }
    assert fc["checked"] > 0 and q["uncertain_band_checked"] == fc["checked"]
    assert q["est_false_negative_rate"] == round(fc["confirmed"] / fc["checked"], 5)
    assert q["gap_pos_minus_hardest_neg"]["mean"] is not None
    assert m["score_source"]["source"] == "teacher"


def test_confirmed_false_negatives_are_forbidden_not_negatives(runs):
    out, _ = runs[1]
    fc = read_manifest(out / "shards")["fncheck"]
    forb = pl.read_parquet(out / "forbidden.parquet")
    confirmed = forb.filter(pl.col("reason") == "confirmed_false_negative")
    assert confirmed.height == fc["dropped"] > 0
    shards = pl.read_parquet(out / "shards" / "*.parquet")
    negs = set(shards.explode("neg_ids").select("query_id", "neg_ids").iter_rows())
    assert not negs & set(confirmed.select("query_id", "doc_id").iter_rows())


def test_shard_scores_are_the_teachers(runs, tiny_cross_encoder):
    out, _ = runs[1]
    shards = pl.read_parquet(out / "shards" / "*.parquet")
    rows = shards.head(5)
    sc = load(str(tiny_cross_encoder), "cross_encoder", 64, "teacher.scorer", "cpu")
    want = sc.score(rows["query"].to_list(), rows["pos"].to_list())
    np.testing.assert_allclose(rows["pos_score"].to_numpy(), want, atol=1e-4)
    r = shards.filter(pl.col("negs").list.len() > 0).row(0, named=True)  # a row may have none
    want = sc.score([r["query"]] * len(r["negs"]), r["negs"])
    np.testing.assert_allclose(r["neg_scores"], want, atol=1e-4)


def _batch_with(rows: pl.DataFrame, doc: str, as_positive: bool) -> pl.DataFrame:
    """Put ``doc`` into row 1 as its positive or as an extra negative."""
    r = rows.to_dicts()
    if as_positive:
        r[1]["pos_id"], r[1]["pos"] = doc, "planted"
    else:
        r[1]["neg_ids"], r[1]["negs"] = [*r[1]["neg_ids"], doc], [*r[1]["negs"], "planted"]
    return pl.DataFrame(r, schema=rows.schema)


@pytest.mark.parametrize("loss", ["standard", "multi_positive"])
@pytest.mark.parametrize("as_positive", [False, True])
def test_planted_false_negative_is_masked_in_batch(runs, as_positive, loss):
    """Doc X rejected for query q while mining, X in another row of q's batch: the trainer's mask
    removes exactly (q's row, X's column), read back from forbidden.parquet through the manifest."""
    out, _ = runs[1]
    forbidden = load_forbidden(out / "shards")
    forb = pq.read_table(out / "forbidden.parquet").to_pylist()
    q, x = next((f["query_id"], f["doc_id"]) for f in forb if f["reason"] != "known_positive")
    shards = pl.read_parquet(out / "shards" / "*.parquet")
    row_q = shards.filter(pl.col("query_id") == q).head(1)
    other = shards.filter(
        (pl.col("query_id") != q)
        & (pl.col("pos_id") != x)
        & ~pl.col("neg_ids").list.contains(x)
        & ~pl.col("pos_id").is_in(row_q["neg_ids"].explode().implode())
    ).head(1)
    batch = _batch_with(pl.concat([row_q, other]), x, as_positive)
    cfg = TrainConfig(loss=loss)
    _, _, col_ids, known, rejected = batch_columns(batch, forbidden)
    with_forbidden, _ = batch_masks(cfg, col_ids, known, rejected)
    without, _ = batch_masks(cfg, col_ids, known, [set(), set()])
    col_x = col_ids.index(x)
    assert col_x == (1 if as_positive else len(col_ids) - 1)
    assert (with_forbidden & ~without).nonzero().tolist() == [[0, col_x]]
    assert (without & ~with_forbidden).sum() == 0
