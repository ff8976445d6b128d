"""The sections of ``curate report``: each takes the loaded run and returns an HTML fragment
(tables, notes and matplotlib figures embedded as base64 PNG). A part the run lacks gives a note."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from curate import health
from curate.eval.metrics import METRICS
from curate.records import TIMED
from curate.report import markup as mk
from curate.schema import FORBIDDEN_REASONS, OTHER_REASONS

if TYPE_CHECKING:
    from curate.report.data import RunData

# Funnel order: candidates, the likely-false-negative drops (forbidden, masked in training), the
# other drops, kept. Reasons not listed here (added by later versions) go before not_selected.
ALWAYS_SHOWN = ("candidates", *FORBIDDEN_REASONS[:4], *OTHER_REASONS, "kept")  # even when 0
COLORS = {"pos": "#2ca02c", "neg": "#1f77b4", "drop": "#d62728", "all": "#7f7f7f"}

# --- sections ------------------------------------------------------------------------------


def overview(d: RunData) -> str:
    parts = [f'<p class="sub">run folder <code>{mk.esc(d.run_dir)}</code></p>']
    counts = (d.manifest or {}).get("counts") or (d.report or {}).get("manifest", {}).get(
        "counts", {}
    )
    keys = (
        "docs",
        "duplicate_docs",
        "queries",
        "train_pairs",
        "rows",
        "batches",
        "topics",
        "forbidden_pairs",
    )
    rows = [[k, counts[k]] for k in keys if k in counts]
    if d.manifest:
        cfg = d.manifest.get("config", {})
        rows += [
            ["model", cfg.get("embed", {}).get("model", "?")],
            ["seed", d.manifest.get("seed", "?")],
        ]
    tables = [mk.table(["", "value"], rows) if rows else mk.note("no shard manifest in this run")]
    used = (d.manifest or {}).get("effective") or []
    if used:  # settings the run changed from the config (calibrated ceiling, raised nprobe, ...)
        tables.append(
            mk.table(["setting", "configured", "used", "why"],
                   [[e.get("key"), e.get("configured"), e.get("used"), e.get("why")] for e in used])
        )  # fmt: skip
    timings = (d.report or {}).get("timings")
    if timings:
        order = sorted(timings, key=lambda k: (TIMED + (k,)).index(k))
        rows = [[k, f"{timings[k]:.1f}"] for k in order] + [
            ["total", f"{sum(timings.values()):.1f}"]
        ]
        tables.append(mk.table(["stage", "seconds"], rows))
    return "".join(parts) + '<div class="grid">' + "".join(tables) + "</div>"


def funnel_rows(funnel: dict) -> list[tuple[str, int]]:
    """(stage, count) in funnel order: candidates, each drop reason, kept."""
    known = ("candidates", "kept", *FORBIDDEN_REASONS, *OTHER_REASONS)
    extra = sorted(k for k in funnel if k not in known)
    order = ("candidates", *FORBIDDEN_REASONS, *extra, *OTHER_REASONS, "kept")
    return [(k, int(funnel.get(k, 0))) for k in order if k in funnel or k in ALWAYS_SHOWN]


def _funnel_color(name: str) -> str:
    if name in ("candidates", "kept"):
        return COLORS["all"] if name == "candidates" else COLORS["pos"]
    return COLORS["drop"] if name in FORBIDDEN_REASONS else "#ff7f0e"


def funnel_section(d: RunData) -> str:
    funnel = (d.manifest or {}).get("funnel")
    if not funnel:
        return mk.note("no funnel: the run has not reached the batch stage (curate batch)")
    rows = funnel_rows(funnel)
    total = max(funnel.get("candidates", 0), 1)
    fig, (ax,) = mk.figure(width=8, height=0.45 * len(rows) + 1)
    names = [n for n, _ in rows]
    colors = [_funnel_color(n) for n in names]
    ax.barh(names[::-1], [c for _, c in rows][::-1], color=colors[::-1])
    for i, (_, c) in enumerate(rows[::-1]):
        ax.text(c, i, f" {c:,} ({c / total:.1%})", va="center", fontsize=9)
    ax.set_xlabel("(query, candidate) pairs")
    ax.margins(x=0.25)
    table = mk.table(
        ["stage", "pairs", "share of candidates", "masked in training"],
        [[n, c, f"{c / total:.1%}", "yes" if n in FORBIDDEN_REASONS else ""] for n, c in rows],
    )
    quality = (d.manifest or {}).get("mining_quality") or {}
    gap = (quality.get("gap_pos_minus_hardest_neg") or {}).get("median")
    extra = (
        [f"median score gap positive - hardest kept negative: {gap:.4f}"] if gap is not None else []
    )
    if quality.get("est_false_negative_rate") is not None:
        extra.append(
            "estimated false-negative rate in the uncertain band: "
            f"{quality['est_false_negative_rate']:.1%}"
        )
    return (
        mk.img(fig, "filter funnel")
        + table
        + "".join(f"<p>{mk.esc(t)}</p>" for t in extra)
        + mk.note(
            "red: dropped as likely false negatives (forbidden pairs, masked by the trainer); "
            "orange: dropped by the rank window or not needed"
        )
    )


def scores_section(d: RunData) -> str:
    if d.shards is None or d.shards.height == 0:
        return mk.note("no shards: nothing to plot")
    pos = d.shards["pos_score"].to_numpy()
    neg = d.shards["neg_scores"].explode().drop_nulls().to_numpy()
    source = ((d.manifest or {}).get("score_source") or {}).get("source", "miner")
    dropped: dict[str, np.ndarray] = {}
    notes = []
    if d.forbidden is None:
        notes.append("forbidden.parquet not found: dropped candidates are not shown")
    elif "score" not in d.forbidden.columns:
        notes.append(
            "this run's forbidden.parquet has no score column: dropped candidates are not shown"
        )
    else:
        for (reason,), g in d.forbidden.group_by("reason", maintain_order=True):
            dropped[reason] = g["score"].drop_nulls().to_numpy()
    ncols = 2 if source != "miner" and dropped else 1  # a teacher's scale is not the miner's
    bins = _bins(pos, neg, *(dropped.values() if ncols == 1 else ()))
    drop_bins = _bins(*dropped.values()) if ncols == 2 else bins
    fig, axes = mk.figure(ncols, width=8 if ncols == 1 else 5.5, height=3.8)
    ax = axes[0]
    ax.hist(
        pos,
        bins=bins,
        density=True,
        alpha=0.45,
        color=COLORS["pos"],
        label=f"positives (n={len(pos):,})",
    )
    if len(neg):  # a run that kept none: no histogram (density of nothing divides by zero)
        ax.hist(
            neg,
            bins=bins,
            density=True,
            alpha=0.45,
            color=COLORS["neg"],
            label=f"kept negatives (n={len(neg):,})",
        )
    ax.set_title(f"{source} scores" if ncols == 2 else "")
    drop_ax = axes[-1]
    reds = ["#d62728", "#ff9896", "#8c564b", "#e377c2", "#9467bd", "#bcbd22"]
    for (reason, v), c in zip(sorted(dropped.items()), reds):
        drop_ax.hist(
            v,
            bins=drop_bins,
            density=True,
            histtype="step",
            lw=1.8,
            color=c,
            label=f"dropped: {reason} (n={len(v):,})",
        )
    if ncols == 2:
        drop_ax.set_title("miner scores of dropped candidates")
        notes.append(
            f"positives and kept negatives carry {source} scores; dropped ones miner scores"
        )
    for a in axes:
        a.set_xlabel("query-document score")
        a.set_ylabel("density")
        a.legend(fontsize=8)
    stats = [
        ["positives", len(pos), *_quartiles(pos)],
        ["kept negatives", len(neg), *_quartiles(neg)],
    ]
    stats += [[f"dropped: {r}", len(v), *_quartiles(v)] for r, v in sorted(dropped.items())]
    notes.append(
        "out_of_window and not_selected candidates are not stored, so they are not plotted"
    )
    return (
        mk.img(fig, "score distributions")
        + mk.table(["", "n", "25%", "median", "75%"], stats)
        + "".join(mk.note(n) for n in notes)
    )


def _bins(*values: np.ndarray) -> np.ndarray | int:
    """50 shared bins over the range of all ``values``, so the histograms line up."""
    allv = np.concatenate([v for v in values if len(v)] or [np.zeros(0)])
    return np.linspace(float(allv.min()), float(allv.max()) + 1e-6, 51) if len(allv) else 10


def _quartiles(v: np.ndarray) -> list:
    return [float(x) for x in np.percentile(v, [25, 50, 75])] if len(v) else ["", "", ""]


def topics_section(d: RunData) -> str:
    if d.shards is None or d.shards.height == 0:
        return mk.note("no shards: no topics")
    sizes = (
        d.shards.group_by("topic")
        .agg(pl.col("query_id").n_unique().alias("queries"))
        .sort("queries", "topic", descending=[True, False])
    )
    q = sizes["queries"].to_numpy()
    fig, (ax,) = mk.figure(width=8)
    ax.bar(np.arange(len(q)), q, width=0.9 if len(q) < 100 else 1.0, color=COLORS["neg"])
    ax.set_xlabel("topic cluster (largest first)")
    mk.integer_ticks(ax)
    ax.set_ylabel("training queries")
    rows = [
        ["topics", len(q)],
        ["largest", int(q.max())],
        ["median", float(np.median(q))],
        ["smallest", int(q.min())],
    ]
    return mk.img(fig, "topic cluster sizes") + mk.table(["", "queries per topic"], rows)


def batch_stats(shards: pl.DataFrame) -> pl.DataFrame:
    """Per batch: rows, columns (positives + negatives) and unique documents among them."""
    rows = shards.group_by("batch_id").agg(pl.len().alias("rows"))
    docs = (
        shards.select("batch_id", pl.concat_list("pos_id", "neg_ids").alias("doc"))
        .explode("doc")
        .group_by("batch_id")
        .agg(pl.len().alias("columns"), pl.col("doc").n_unique().alias("unique_docs"))
    )
    return rows.join(docs, on="batch_id").sort("batch_id")


def batches_section(d: RunData) -> str:
    if d.shards is None or d.shards.height == 0:
        return mk.note("no shards: no batches")
    st = batch_stats(d.shards)
    masked = np.array([r["masked_fraction"] for r in d.train_log if "masked_fraction" in r])
    fig, axes = mk.figure(2 if len(masked) else 1, width=5.5 if len(masked) else 8)
    ax = axes[0]
    ax.bar(
        st["batch_id"].to_numpy(),
        st["columns"].to_numpy(),
        width=1.0,
        color="#c7c7c7",
        label="columns",
    )
    ax.bar(
        st["batch_id"].to_numpy(),
        st["unique_docs"].to_numpy(),
        width=1.0,
        color=COLORS["neg"],
        label="unique docs",
    )
    ax.set_xlabel("batch")
    mk.integer_ticks(ax)
    ax.set_ylabel("documents per batch")
    ax.legend(fontsize=8)
    if len(masked):
        axes[1].plot(np.arange(1, len(masked) + 1), masked, color=COLORS["drop"])
        axes[1].set_xlabel("training step (= batch, in shard order)")
        mk.integer_ticks(axes[1])
        axes[1].set_ylabel("masked fraction of the denominator")
        axes[1].set_ylim(bottom=0)
    u = st["unique_docs"].to_numpy()
    rows = [
        ["batches", st.height],
        ["rows per batch (mean)", float(st["rows"].mean())],
        ["unique docs per batch (mean)", float(u.mean())],
        ["unique docs per batch (min / max)", f"{u.min()} / {u.max()}"],
    ]
    counts = (d.manifest or {}).get("counts", {})
    rows += [
        [k, counts[k]]
        for k in ("full_batches", "masked_pairs", "neg_dropped_in_batch")
        if k in counts
    ]
    if len(masked):
        rows.append(["masked fraction (mean over steps)", float(masked.mean())])
    note = (
        ""
        if len(masked)
        else mk.note("no training log: masked fraction is measured while training")
    )
    return mk.img(fig, "batch statistics") + mk.table(["", "value"], rows) + note


def training_section(d: RunData) -> str:
    if not d.train_log:
        return mk.note("no training log (model/train_log.jsonl): run `curate train`")
    steps = np.array([r["step"] for r in d.train_log])
    fig, axes = mk.figure(2, width=5.5)
    axes[0].plot(steps, [r["loss"] for r in d.train_log], label="loss")
    axes[0].plot(steps, [r.get("mi_bound", np.nan) for r in d.train_log], label="MI lower bound")
    axes[0].set_xlabel("step")
    axes[0].legend(fontsize=8)
    axes[1].plot(steps, [r.get("examples_per_s", np.nan) for r in d.train_log], color="#9467bd")
    axes[1].set_xlabel("step")
    mk.integer_ticks(axes[0])
    mk.integer_ticks(axes[1])
    axes[1].set_ylabel("examples / s")
    last = d.train_log[-1]
    loss = health.loss_summary(d.train_log)
    short = (
        f" (short batch: {loss['last_rows']} of {loss['full_rows']} rows)"
        if loss["short_last_batch"]
        else ""
    )
    rows = [
        ["steps", int(steps[-1])],
        [f"final loss (mean of the last {loss['smoothed_steps']} full batches)",
         loss["smoothed_loss"]],
        ["last step's loss" + short, float(last["loss"])],
        ["temperature", float(last.get("temperature", np.nan))],
    ]  # fmt: skip
    note = mk.note("a short batch has fewer in-batch negatives: its loss is on a lower scale")
    return mk.img(fig, "training curves") + mk.table(["", "value"], rows) + (note if short else "")


def evaluation_section(d: RunData) -> str:
    ev = (d.report or {}).get("eval") or {}
    parts = []
    if ev:
        names = [n for n in ("base", "trained") if n in ev]
        header = ["metric", *names] + (["change"] if len(names) == 2 else [])
        rows = []
        for m in METRICS:
            vals = [float(ev[n][m]) for n in names]
            change = [f"{vals[1] - vals[0]:+.4f}"] if len(vals) == 2 else []
            rows.append([m, *(f"{v:.4f}" for v in vals), *change])
        if d.run_dir != d.out:  # a loop folder: the sections show its latest round
            parts.append(mk.note(f"{d.run_dir.name}: 'base' is the model the round started from"))
        queries = ev[names[0]].get("queries") if names else None
        parts.append(
            mk.table(header, rows) + (f"<p>{queries:,} held-out queries</p>" if queries else "")
        )
    else:
        parts.append(
            mk.note("no evaluation in report.json: run `curate eval` (needs data.eval_split)")
        )
    if d.rounds:
        fig, (ax,) = mk.figure(width=7)
        r = [row["round"] for row in d.rounds]
        for m in METRICS:
            ax.plot(r, [row.get(m, np.nan) for row in d.rounds], marker="o", label=m)
        ax.set_xticks(r)
        ax.set_xlabel("round (0 = base model)")
        ax.set_ylabel("held-out score")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        rows = [[row["round"], *(f"{row.get(m, np.nan):.4f}" for m in METRICS)] for row in d.rounds]
        parts.append(
            "<h3>Retrain loop</h3>"
            + mk.img(fig, "per-round evaluation")
            + mk.table(["round", *METRICS], rows)
        )
    else:
        parts.append(mk.note("no retrain loop here (curate loop writes loop.json)"))
    return "".join(parts)
