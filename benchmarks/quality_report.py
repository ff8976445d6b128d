"""Tables, docs/quality.md blocks and docs/quality.png from the quality benchmark's results."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

METRICS = ("ndcg@10", "recall@100", "mrr@10")
WHAT = {
    "A": "base model, no training",
    "B-st": "in-batch negatives, random batches; ST trainer + MNRL",
    "B-curate": "in-batch negatives, random batches; curate trainer, no masks",
    "C-default": "ST mine_hard_negatives defaults + MNRL (NO_DUPLICATES batches)",
    "C-nv": "ST mine_hard_negatives, relative_margin=0.05, top + MNRL (NO_DUPLICATES)",
    "D": "curate defaults: filtered negatives, topic-spread batches, masks; curate trainer",
    "E-nomask": "D without the mask (train.mask: false)",
    "E-notopic": "D without topic handling (batch.topics: off)",
}
MINER = {"C-default": "C-default", "C-nv": "C-nv", "D": "D", "E-nomask": "D", "E-notopic": "D"}


def _variants() -> None:
    from quality_arms import VARIANTS

    for name, sets in VARIANTS.items():
        WHAT[name] = "D with " + ", ".join(f"{k}={v}" for k, v in sets.items())


_variants()


def load_note(res: dict) -> str:
    """Whether the benchmark had the machine to itself: its own runs keep the 1-minute load
    average near the CPU count; more means other jobs shared the cores."""
    loads = [x for r in res["runs"] for x in r.get("loadavg") or []]
    if not loads:
        return "load average not recorded"
    top = max(loads)
    alone = top <= res["cpus"] + 0.5
    shared = "the benchmark alone on the cores" if alone else "other jobs shared the cores"
    return f"load average {min(loads):.1f}-{top:.1f} per run, {shared}"


def _mean_std(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def aggregate(res: dict) -> dict:
    """arm -> {metric: (mean, std)}, FN rates, negatives per row, mean train seconds."""
    out = {}
    for arm in res["arms"]:
        runs = [r for r in res["runs"] if r["arm"] == arm]
        if not runs:
            continue
        row = {m: _mean_std([r["metrics"][m] for r in runs]) for m in METRICS}
        row["seeds"] = len(runs)
        row["train_s"] = float(np.mean([r["train_s"] for r in runs]))
        ib = [r["in_batch_fn"]["fn_rate"] for r in runs if "in_batch_fn" in r]
        row["in_batch_fn"] = float(np.mean(ib)) if ib else None
        row["mined_fn"], row["negs_per_row"] = None, None
        if arm in res.get("st_mining", {}):
            m = res["st_mining"][arm]
            row["mined_fn"] = m["mined_fn"]["fn_rate"]
            row["negs_per_row"] = m["mined_fn"]["negatives"] / max(m["rows"], 1)
        elif any("mined_fn" in r for r in runs):
            row["mined_fn"] = float(np.mean([r["mined_fn"]["fn_rate"] for r in runs]))
            row["negs_per_row"] = float(
                np.mean([r["mined_fn"]["negatives"] / max(r["counts"]["rows"], 1) for r in runs])
            )
        probe = res.get("probe") or {}
        row["probe_fn"] = probe[MINER[arm]]["fn_rate"] if MINER.get(arm) in probe else None
        out[arm] = row
    return out


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def table(res: dict) -> str:
    agg = aggregate(res)
    head = (
        "| arm | what | seeds | nDCG@10 | Recall@100 | MRR@10 | FN probe (planted) "
        "| FN train negs | in-batch FN | negs/row | train s/run |"
    )
    lines = [head, "|" + " --- |" * 11]
    for arm, r in agg.items():
        if arm == "A" or r["seeds"] > 1:  # A is deterministic: its spread is 0 by construction
            ms = " | ".join(f"{r[m][0]:.4f} ± {r[m][1]:.4f}" for m in METRICS)
        else:
            ms = " | ".join(f"{r[m][0]:.4f} (1 seed)" for m in METRICS)
        npr = "—" if r["negs_per_row"] is None else f"{r['negs_per_row']:.2f}"
        lines.append(
            f"| {arm} | {WHAT[arm]} | {r['seeds']} | {ms} | {_pct(r['probe_fn'])} "
            f"| {_pct(r['mined_fn'])} "
            f"| {_pct(r['in_batch_fn'])} | {npr} | {r['train_s']:.0f} |"
        )
    return "\n".join(lines)


def verdict(res: dict) -> list[str]:
    agg, out = aggregate(res), []
    if "D" not in agg:
        return out
    d = agg["D"]
    for c in ("C-default", "C-nv"):
        if c not in agg:
            continue
        diff = d["ndcg@10"][0] - agg[c]["ndcg@10"][0]
        spread = max(d["ndcg@10"][1], agg[c]["ndcg@10"][1])
        word = "beats" if diff > 0 else "trails"
        within = " (within the seed spread)" if abs(diff) <= spread else ""
        out.append(
            f"- nDCG@10: D {word} {c} by {abs(diff):.4f}{within}; largest seed std of the two: "
            f"{spread:.4f}."
        )
        key = "probe_fn" if d["probe_fn"] is not None else "mined_fn"
        name = "planted-positive probe" if key == "probe_fn" else "training negatives"
        dv, cv = d[key], agg[c][key]
        if dv is not None and cv is not None:
            ok = dv <= 0.5 * cv
            out.append(
                f"- FN rate ({name}): D {_pct(dv)} vs {c} {_pct(cv)}: "
                f"{'meets' if ok else 'misses'} the goal D <= half of C."
            )
    return out


def block(res: dict) -> str:
    s = res["settings"]
    probe = res.get("probe")
    lines = [
        f"### {res['dataset']} (`{res['path']}`)",
        "",
        f"{res['docs']} docs, {res['train_pairs']} train pairs, "
        f"{res['test_queries']} test queries. "
        f"Seeds {res['seeds']}; {s['steps']} steps, batch {s['batch_size']}, {s['num_negatives']} "
        f"negatives per query, lr {s['lr']}, warmup {s['warmup_steps']}, weight decay "
        f"{s['weight_decay']}, temperature {s['temperature']}, train max length "
        f"{s['train_max_length']}, mining/eval max length {s['max_length']}.",
        "",
        f"Command: `{res['command']}`  ",
        f"Compute time of the finished work: {res['compute_s'] / 60:.1f} min (setup "
        f"{sum(res['setup_s'].values()) / 60:.1f} min + the runs) on {res['cpus']} CPUs; "
        f"{load_note(res)}.",
        "",
        *(
            [f"Not run (out of time): {', '.join(res['missing'])}.", ""]
            if res.get("missing")
            else []
        ),
        table(res),
        "",
        f"Base model through sentence-transformers' encode: nDCG@10 "
        f"{res['base_via_sentence_transformers']['ndcg@10']:.4f} vs curate's Encoder "
        f"{res['base']['ndcg@10']:.4f} (same pooling and normalisation).",
    ]
    if probe:
        lines.append(
            f"Probe: {probe['hidden_positives']} positives of {probe['queries_with_hidden']} "
            "train queries hidden from every miner. Per miner (negatives / hidden mined / "
            "exact dup / near dup): "
            + "; ".join(
                f"{k} {v['negatives']} / {v['hidden_positive']} / {v['exact_duplicate']} / "
                f"{v['near_duplicate']}"
                for k, v in probe.items()
                if isinstance(v, dict)
            )
        )
    for arm, m in res.get("st_mining", {}).items():
        lines.append(
            f"{arm}: {m['rows']} of {m['pairs']} pairs kept by mine_hard_negatives (n-tuple "
            "format drops pairs that found fewer negatives)."
        )
    lines += ["", *verdict(res)]
    return "\n".join(lines)


def write_docs(res: dict, docs: Path) -> None:
    docs.mkdir(parents=True, exist_ok=True)
    (docs / f"quality-{res['dataset']}.json").write_text(json.dumps(res, indent=1) + "\n")
    md = docs / "quality.md"
    text = md.read_text() if md.is_file() else "# Quality benchmark\n"
    start, end = (
        f"<!-- quality:{res['dataset']}:start -->",
        f"<!-- quality:{res['dataset']}:end -->",
    )
    new = f"{start}\n{block(res)}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: new, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + new + "\n"
    md.write_text(text)
    plot(sorted(docs.glob("quality-*.json")), docs / "quality.png")


def plot(paths: list[Path], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [json.loads(p.read_text()) for p in paths]
    cols = (*METRICS, "FN rate")
    fig, axes = plt.subplots(len(results), 4, figsize=(18, 3.8 * len(results)), squeeze=False)
    for row, res in zip(axes, results):
        agg = aggregate(res)
        names = list(agg)
        x = np.arange(len(names))
        for ax, m in zip(row, cols):
            if m == "FN rate":
                probe = [agg[a]["probe_fn"] for a in names]
                vals = (
                    probe
                    if any(v is not None for v in probe)
                    else [agg[a]["mined_fn"] for a in names]
                )
                ax.bar(x, [100 * (v or 0) for v in vals], color="tab:red")
                ax.set_title(
                    f"{res['dataset']}: mined-negative FN %"
                    + (" (planted probe)" if vals is probe else "")
                )
            else:
                ax.bar(
                    x,
                    [agg[a][m][0] for a in names],
                    yerr=[agg[a][m][1] for a in names],
                    capsize=3,
                    color=[
                        "tab:gray" if a == "A" else "tab:blue" if a[0] in "BC" else "tab:green"
                        for a in names
                    ],
                )
                lo = min(agg[a][m][0] for a in names)
                ax.set_ylim(max(0.0, lo - 0.08), None)
                ax.set_title(f"{res['dataset']}: {m} (mean ± std over seeds)")
            ax.set_xticks(x, names, rotation=35, ha="right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
