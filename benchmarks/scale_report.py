"""docs/pipeline-scale.json (runs merged by N and cluster mode), its table and its plot, for
``benchmarks/pipeline_scale.py``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

ABOUT = (
    "curate run on synthetic corpora (benchmarks/scale_corpus.py: N docs in ~sqrt(N) topics, "
    "N/10 queries with one positive each, 384-d vectors given through data.columns.vector, so "
    "no model runs), train and eval off, index.factory auto, measured from outside by "
    "benchmarks/pipeline_scale.py. timings: report.json's seconds per stage; wall_s: the "
    "driver process from start to exit; *_peak_rss_mb: each process's kernel high-water mark "
    "(VmHWM), read every 0.2 s; with a LocalCluster the scheduler runs inside the driver, with "
    "the CLI cluster in its own process; scheduler_bytes: pipelines.traffic's meter (argument "
    "bytes of every task plus result bytes, an upper bound of what the scheduler carried)."
)
TARGETS = {
    "driver_peak_rss_mb": "< 1536 at every N",
    "time": "grows no faster than ~N log N",
    "worker_peak_rss_mb": "bounded by the partition size, not by N",
    "largest task argument/result": "a few KB",
}


def merge_runs(path: Path, runs: list[dict]) -> dict:
    """Add ``runs`` to the results at ``path``, replacing any earlier run of the same N and
    mode; written to a temporary name, then renamed."""
    old = json.loads(path.read_text()) if path.is_file() else {}
    keep = {(r["n_docs"], r["mode"]): r for r in old.get("runs", [])}
    keep |= {(r["n_docs"], r["mode"]): r for r in runs}
    res = {
        "about": ABOUT,
        "targets": TARGETS,
        "runs": [keep[k] for k in sorted(keep, key=lambda k: (k[0], k[1]))],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(res, indent=1) + "\n")
    os.replace(tmp, path)
    return res


def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _kb(x: int | None) -> str:
    return "-" if x is None else f"{x / 1024:,.1f}"


def stages(runs: list[dict]) -> list[str]:
    """The stage names the runs timed, in run order (report.json sorts its keys)."""
    from curate.records import TIMED

    seen = {s for r in runs for s in r.get("timings") or {}}
    return [s for s in TIMED if s in seen] + sorted(seen - set(TIMED))


def table(runs: list[dict]) -> str:
    """Markdown: seconds per stage, wall, peak MB per process, scheduler traffic."""
    names = stages(runs)
    head = [
        "N",
        "mode",
        "status",
        *names,
        "wall s",
        "driver MB",
        "worker MB",
        "sched MB",
        "sched traffic MB",
        "max arg KB",
        "max result KB",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in runs:
        t = r.get("timings") or {}
        traffic = r.get("scheduler_bytes")
        cells = [
            f"{r['n_docs']:,}",
            r["mode"],
            r["status"],
            *[f"{t[s]:.1f}" if s in t else "-" for s in names],
            f"{r['wall_s']:.1f}",
            _mb(r.get("driver_peak_rss_mb")),
            _mb(r.get("worker_peak_rss_mb")),
            _mb(r.get("scheduler_peak_rss_mb")),
            "-" if traffic is None else f"{traffic / 2**20:,.2f}",
            _kb(r.get("largest_arg_bytes")),
            _kb(r.get("largest_result_bytes")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    """Left: seconds per stage and wall time against N; right: peak RSS of the driver, the
    largest worker and the CLI scheduler against N. Log-log; solid local, dashed CLI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    ok = [r for r in runs if r["status"] == "ok"]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    styles = {"local": "-", "cli": "--"}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = stages(ok)
    memory = {
        "driver_peak_rss_mb": "driver",
        "worker_peak_rss_mb": "largest worker",
        "scheduler_peak_rss_mb": "CLI scheduler",
    }
    for mode, ls in styles.items():
        rs = sorted((r for r in ok if r["mode"] == mode), key=lambda r: r["n_docs"])
        for i, s in enumerate(names):
            pts = [(r["n_docs"], (r["timings"] or {}).get(s)) for r in rs]
            pts = [(x, y) for x, y in pts if y and y > 0]
            if pts:
                ax_t.plot(
                    *zip(*pts, strict=True), ls, marker="o", ms=3, color=colors[i % len(colors)]
                )
        if rs:
            ax_t.plot(
                [r["n_docs"] for r in rs],
                [r["wall_s"] for r in rs],
                ls,
                marker="s",
                color="k",
                lw=2,
            )
        for j, key in enumerate(memory):
            pts = [(r["n_docs"], r[key]) for r in rs if r.get(key)]
            if pts:
                ax_m.plot(*zip(*pts, strict=True), ls, marker="o", color=colors[j])
    # One legend entry per stage (colour) and per mode (line style), not per line.
    mode_keys = [Line2D([], [], color="grey", ls=ls, label=m) for m, ls in styles.items()]
    ax_t.legend(
        handles=[
            Line2D([], [], color=colors[i % len(colors)], marker="o", label=s)
            for i, s in enumerate(names)
        ]
        + [Line2D([], [], color="k", lw=2, marker="s", label="wall (driver process)")]
        + mode_keys,
        fontsize=7,
        ncol=2,
    )
    ax_m.legend(
        handles=[
            Line2D([], [], color=colors[j], marker="o", label=label)
            for j, label in enumerate(memory.values())
        ]
        + [Line2D([], [], color="r", lw=0.8, ls=":", label="driver target 1.5 GB")]
        + mode_keys,
        fontsize=7,
    )
    _guides(ax_t, ok)
    ax_m.axhline(1536, color="r", lw=0.8, ls=":", label="driver target 1.5 GB")
    for ax, ylabel in ((ax_t, "seconds"), (ax_m, "peak RSS, MB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("documents (N); queries N/10")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.set_title("time per stage")
    ax_m.set_title("peak memory per process")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _guides(ax, ok: list[dict]) -> None:
    """An N log N line through the smallest run's wall time, to read the growth against."""
    if len({r["n_docs"] for r in ok}) < 2:
        return
    first = min(ok, key=lambda r: r["n_docs"])
    n0, t0 = first["n_docs"], first["wall_s"]
    xs = sorted({r["n_docs"] for r in ok})
    ax.plot(xs, [t0 * x * math.log(x) / (n0 * math.log(n0)) for x in xs], ":", color="grey")
    ax.annotate(
        "~N log N",
        (xs[-1], t0 * xs[-1] * math.log(xs[-1]) / (n0 * math.log(n0))),
        fontsize=7,
        color="grey",
    )
