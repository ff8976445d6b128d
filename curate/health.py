"""Loud warnings: checks that turn a run's numbers into plain warnings a user cannot miss.

Every check is a pure function from what a run wrote (the shard manifest, report.json's eval,
the training log) to a list of warnings, each ``{"code", "level", "message", "likely_causes"}``.
``level`` is "failure" (the run did harm: the trained model is worse than the base model) or
"warning" (the run finished, but its data is suspect). The CLI prints them last, the manifest and
report.json store them, and report.html shows them above everything else.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# Below these floors a run "keeps (almost) no negatives" and says so loudly.
KEPT_SHARE_FLOOR = 0.25  # negatives kept / negatives asked for (train pairs x mine.num_negatives)
ROWS_WITH_NEGATIVES_FLOOR = 0.5  # rows holding at least one hard negative / rows
# Random document pairs of a healthy embedder sit near 0.0-0.3 cosine; a collapsed one puts every
# text in one direction, so near-duplicate and ceiling filters reject every candidate.
COLLAPSE_COSINE = 0.9
COSINE_PAIRS = 1000
SMOOTH_STEPS = 10  # "final loss" = mean over the last full batches, at most this many

# Funnel keys that are not drops (or not drops that remove a usable negative).
NOT_DROPS = ("candidates", "kept", "not_selected", "spare", "spare_unused")


def warning(
    code: str, message: str, causes: list[str] | None = None, level: str = "warning"
) -> dict:
    return {"code": code, "level": level, "message": message, "likely_causes": causes or []}


def embedding_health(vecs: np.ndarray, seed: int, pairs: int = COSINE_PAIRS) -> dict:
    """Mean cosine of ``pairs`` seeded random pairs of distinct rows of ``vecs`` [N, D]."""
    n = len(vecs)
    if n < 2:
        return {"mean_cosine": None, "pairs": 0, "threshold": COLLAPSE_COSINE, "collapsed": False}
    rng = np.random.default_rng(seed)
    a = rng.integers(0, n, pairs)
    b = (a + rng.integers(1, n, pairs)) % n  # never a == b
    x, y = vecs[a].astype(np.float64), vecs[b].astype(np.float64)
    norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    cos = (x * y).sum(axis=1) / np.maximum(norms, 1e-12)
    mean = round(float(cos.mean()), 4)  # 4 places: float noise never flips the record
    return {"mean_cosine": mean, "pairs": pairs, "threshold": COLLAPSE_COSINE,
            "collapsed": mean > COLLAPSE_COSINE}  # fmt: skip


def _config(manifest: dict, section: str) -> dict:
    return (manifest.get("config") or {}).get(section) or {}


def effective(manifest: dict, key: str):
    """The value a run used for ``key`` (e.g. "mine.max_relative"): the manifest's effective
    settings, else the ceiling calibration, else the configured value."""
    for rec in manifest.get("effective") or []:
        if rec.get("key") == key:
            return rec.get("used")
    cal = manifest.get("ceiling_calibration") or {}
    if key == "mine.max_relative" and "max_relative" in cal:
        return cal["max_relative"]
    section, _, name = key.partition(".")
    return _config(manifest, section).get(name)


def _drop_cause(reason: str, manifest: dict) -> str:
    emb = manifest.get("embedding_health") or {}
    if emb.get("collapsed") and reason in ("near_duplicate", "above_ceiling"):
        return (f"the embeddings look collapsed: random document pairs have mean cosine "
                f"{emb['mean_cosine']:.3f} (> {COLLAPSE_COSINE}), so every candidate looks like "
                "a duplicate of the positive; check embed.model (a random or broken model?), "
                "embed.max_length and the pooling")  # fmt: skip
    causes = {
        "near_duplicate": f"mine.near_dup_threshold "
        f"({effective(manifest, 'mine.near_dup_threshold')}) is below this model's usual "
        "query-document scores, or the corpus holds many near-identical documents",
        "above_ceiling": "the ceiling mine.max_relative "
        f"({effective(manifest, 'mine.max_relative')}) is too low for this data: candidates score "
        "close to the positive (many relevant "
        "documents per query, or a weak model); try mine.calibrate_ceiling",
        "known_positive": "queries have so many known positives that they fill the top of the "
        "ranking; raise mine.top_k",
        "duplicate_of_positive": "the corpus holds many exact duplicates of the positives",
        "ngram_duplicate": f"documents share long word n-grams with the positives (boilerplate?); "
        f"mine.ngram_threshold is {effective(manifest, 'mine.ngram_threshold')}",
        "out_of_window": "the rank window mine.range_min/range_max leaves few candidates",
        "confirmed_false_negative": "the false-negative check confirms most candidates",
        "dropped_as_duplicate": "negatives collapse onto the positive or each other under "
        "canonical (deduplicated) ids: the corpus holds many duplicates",
        "dropped_in_batch": "rows of one batch bring the same negatives (small corpus, or "
        "same-topic batches)",
        "dropped_last": "batch.drop_last removed the rows of the last, short batch",
    }
    return causes.get(reason, f"the {reason} filter")


def dominant_drop(funnel: dict) -> tuple[str, int] | None:
    drops = {k: int(v) for k, v in funnel.items() if k not in NOT_DROPS and v}
    return max(drops.items(), key=lambda kv: (kv[1], kv[0])) if drops else None


def _drop_causes(manifest: dict) -> list[str]:
    funnel = manifest.get("funnel") or {}
    top = dominant_drop(funnel)
    if top is None:
        return ["few candidates to begin with: mine.top_k is small or the corpus is tiny"]
    reason, n = top
    share = n / max(int(funnel.get("candidates", 0)), 1)
    return [f"dominant drop reason: {reason} ({n:,} of {int(funnel.get('candidates', 0)):,} "
            f"candidates, {share:.0%}): {_drop_cause(reason, manifest)}"]  # fmt: skip


def _rows_without(manifest: dict) -> tuple[int, int] | None:
    """(rows without any hard negative, rows), from the shard counts; older manifests only have
    the mining-quality record's pairs."""
    counts = manifest.get("counts") or {}
    if "rows_without_negatives" in counts and counts.get("rows"):
        return int(counts["rows_without_negatives"]), int(counts["rows"])
    q = manifest.get("mining_quality") or {}
    if q.get("pairs"):
        return int(q.get("pairs_without_negatives") or 0), int(q["pairs"])
    return None


def data_warnings(manifest: dict) -> list[dict]:
    """Warnings about the curated data: too few negatives kept, rows without negatives,
    collapsed embeddings."""
    out = []
    counts, funnel = manifest.get("counts") or {}, manifest.get("funnel") or {}
    kept, cand = int(funnel.get("kept", 0)), int(funnel.get("candidates", 0))
    asked = int(counts.get("train_pairs") or 0) * int(
        _config(manifest, "mine").get("num_negatives") or 0
    )
    share = kept / asked if asked else None
    if funnel and share is not None and share < KEPT_SHARE_FLOOR:
        out.append(warning(
            "few_negatives_kept",
            f"the run kept almost no hard negatives: {kept:,} of {cand:,} candidates kept, "
            f"{share:.1%} of the {asked:,} asked for (floor {KEPT_SHARE_FLOOR:.0%})",
            _drop_causes(manifest),
        ))  # fmt: skip
    empty = _rows_without(manifest)
    if empty and empty[0]:
        n, rows = empty
        with_share = 1 - n / rows
        loud = with_share < ROWS_WITH_NEGATIVES_FLOOR
        out.append(warning(
            "rows_without_negatives",
            f"{n:,} of {rows:,} rows ({n / rows:.1%}) have no hard negative"
            + (f": only {with_share:.1%} have one (floor {ROWS_WITH_NEGATIVES_FLOOR:.0%})" if loud
               else "; they train on in-batch negatives only"),
            # the kept-share warning above already names the drop reason
            _drop_causes(manifest) if loud and not out else [],
        ))  # fmt: skip
    emb = manifest.get("embedding_health") or {}
    if emb.get("collapsed"):
        out.append(warning(
            "collapsed_embeddings",
            f"the embeddings look collapsed: mean cosine of {emb.get('pairs')} random document "
            f"pairs is {emb['mean_cosine']:.3f} (> {COLLAPSE_COSINE})",
            ["embed.model is random, broken or not an embedding model; check embed.max_length "
             "and the prefixes"],
        ))  # fmt: skip
    return out


def loss_summary(train_log: list[dict]) -> dict:
    """Final loss as the mean of the last full batches (a short last batch has fewer columns, so
    its loss is on another scale); the last step's own loss and rows beside it."""
    if not train_log:
        return {}
    full = max(int(r.get("rows", 0)) for r in train_log)
    fulls = [r for r in train_log if int(r.get("rows", full)) == full] or train_log
    tail = fulls[-SMOOTH_STEPS:]
    last = train_log[-1]
    return {
        "smoothed_loss": round(float(np.mean([r["loss"] for r in tail])), 5),
        "smoothed_steps": len(tail),
        "last_loss": float(last["loss"]),
        "last_rows": int(last.get("rows", full)),
        "full_rows": full,
        "short_last_batch": int(last.get("rows", full)) < full,
        "masked_fraction": round(
            float(np.mean([r.get("masked_fraction", 0.0) for r in train_log])), 5
        ),
    }


def read_train_log(path: Path) -> list[dict]:
    """The last training run's records of ``train_log.jsonl`` (the log appends across runs)."""
    if not Path(path).is_file():
        return []
    lines = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    starts = [i for i, r in enumerate(lines) if r.get("step") == 1]
    return lines[starts[-1] if starts else 0 :]


def _guard_causes(manifest: dict, train_log: list[dict]) -> list[str]:
    counts, causes = manifest.get("counts") or {}, []
    rows = int(counts.get("rows") or 0)
    for key, what in (("rows_without_negatives", "without a hard negative"),
                      ("rows_short_of_negatives", "short of mine.num_negatives")):  # fmt: skip
        if rows and key in counts:
            causes.append(
                f"{int(counts[key]):,} of {rows:,} rows ({int(counts[key]) / rows:.1%}) {what}"
            )
    masked = loss_summary(train_log).get("masked_fraction")
    if masked is not None:
        causes.append(f"mean masked share of each softmax: {masked:.1%}")
    batches = int(counts.get("full_batches") or counts.get("batches") or 0)
    if "masked_pairs" in counts:
        per = f" ({int(counts['masked_pairs']) / batches:,.1f} per batch)" if batches else ""
        causes.append(f"masked in-batch pairs: {int(counts['masked_pairs']):,}{per}")
    for key in sorted(k for k in counts if "per_query" in k):
        causes.append(f"{key}: {counts[key]}")
    causes.append(f"ceiling used: mine.max_relative = {effective(manifest, 'mine.max_relative')}")
    train = _config(manifest, "train")
    if train:
        causes.append(f"train.lr {train.get('lr')}, train.temperature {train.get('temperature')}")
    return causes


def eval_warnings(
    ev: dict | None,
    manifest: dict,
    train_log: list[dict],
    per_query: dict | None = None,
    metric: str = "ndcg@10",
) -> list[dict]:
    """A "worse_than_base" failure when the trained model scores below the base model."""
    base, trained = ((ev or {}).get(k) or {} for k in ("base", "trained"))
    if metric not in base or metric not in trained or trained[metric] >= base[metric]:
        return []
    return [warning(
        "worse_than_base",
        f"training made the model worse: {metric.replace('ndcg', 'nDCG')} "
        f"{base[metric]:.3f} -> {trained[metric]:.3f} on the held-out split",
        _guard_causes(manifest, train_log)
        + ([f"rows of one query in a batch: mean {per_query['mean']:.2f}, max {per_query['max']}"]
           if per_query else []),
        level="failure",
    )]  # fmt: skip


def verdict(warnings: list[dict]) -> str:
    """The run's verdict: "worse_than_base" when training did harm, "warnings" when the data
    is suspect, else "ok"."""
    if any(w.get("code") == "worse_than_base" for w in warnings):
        return "worse_than_base"
    return "warnings" if warnings else "ok"


def merge(*lists: list[dict]) -> list[dict]:
    """Warnings from several sources, first of each code kept."""
    seen, out = set(), []
    for w in (w for ws in lists for w in ws or []):
        if w.get("code") not in seen:
            seen.add(w.get("code"))
            out.append(w)
    return out


def format_lines(warnings: list[dict]) -> list[str]:
    """The CLI's lines: one "WARNING:" / "FAILURE:" line per warning, its causes indented."""
    lines = []
    for w in warnings:
        lines.append(
            f"{'FAILURE' if w.get('level') == 'failure' else 'WARNING'}: {w.get('message')}"
        )
        lines += [f"  likely cause: {c}" for c in w.get("likely_causes") or []]
    return lines


def rows_per_query(batch_ids, query_ids) -> dict | None:
    """Rows of one query within one batch (mean and max over (batch, query) groups): a query
    with many positives fills a batch with rows whose softmaxes mask each other's positives."""
    if not len(batch_ids):
        return None
    _, sizes = np.unique(np.array([f"{b}\t{q}" for b, q in zip(batch_ids, query_ids)]),
                         return_counts=True)  # fmt: skip
    return {"mean": round(float(sizes.mean()), 3), "max": int(sizes.max())}


def _shard_rows_per_query(shard_dir: Path) -> dict | None:
    import polars as pl

    files = sorted(Path(shard_dir).glob("*.parquet"))
    if not files:
        return None
    df = pl.concat([pl.read_parquet(f, columns=["batch_id", "query_id"]) for f in files])
    return rows_per_query(df["batch_id"].to_list(), df["query_id"].to_list())


def assess(result: dict, config: dict, out: Path) -> dict:
    """-> {"warnings", "verdict"} for a finished run's result (as written to report.json): the
    manifest's data warnings plus the evaluation guard, which reads the run's training log and
    shards in ``out`` for its causes."""
    manifest = {"config": config, **(result.get("manifest") or {})}
    train_log = read_train_log(Path(out) / "model" / "train_log.jsonl") if "model" in result else []
    guard = eval_warnings(result.get("eval"), manifest, train_log)
    if guard:  # only then: the shard read costs a pass over the ids
        per_query = _shard_rows_per_query(Path(out) / "shards")
        guard = eval_warnings(result.get("eval"), manifest, train_log, per_query)
    found = merge(guard, manifest.get("warnings") or data_warnings(manifest))  # failures first
    return {"warnings": found, "verdict": verdict(found)}
