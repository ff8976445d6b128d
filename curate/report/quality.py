"""The report's mining-quality section: index recall, score gap, skip rates, the targeted
false-negative check and deduplication (with examples), all read from the shard manifest."""

from __future__ import annotations

from curate.report import markup as mk


def _recall(rec: dict) -> str:
    if not rec:
        return mk.note("no recall record (run predates the recall guard)")
    if rec.get("exact"):
        return "<p>index: exact (flat) search, recall@k = 1 by construction</p>"
    rows = [[a.get("nprobe"), mk.num(a.get("recall")), a.get("missing_hits"),
             a.get("short_queries")] for a in rec.get("attempts", [])]  # fmt: skip
    return (
        f"<p>approximate index: recall@{rec.get('k')} against exact search on "
        f"{rec.get('sample')} sampled queries = <b>{mk.num(rec.get('recall'))}</b> "
        f"(floor {rec.get('floor')}, action {mk.esc(rec.get('action'))}, nprobe used "
        f"{rec.get('nprobe')})</p>"
        + (mk.table(["nprobe", "recall", "missing hits", "short queries"], rows) if rows else "")
    )


def _quality(q: dict) -> str:
    if not q:
        return mk.note("no mining-quality record")
    gap = q.get("gap_pos_minus_hardest_neg") or {}
    rows = [
        ["pairs", q.get("pairs")],
        ["pairs left without negatives", q.get("pairs_without_negatives")],
        ["score gap positive - hardest kept negative (mean / median)",
         f"{mk.num(gap.get('mean'))} / {mk.num(gap.get('median'))}"],
        ["kept rate", mk.num(q.get("kept_rate"))],
        ["uncertain band checked / confirmed",
         f"{q.get('uncertain_band_checked')} / {q.get('uncertain_band_confirmed')}"],
        ["estimated false-negative rate",
         "n/a (no scorer)" if q.get("est_false_negative_rate") is None
         else f"{q['est_false_negative_rate']:.1%}"],
    ]  # fmt: skip
    skip = q.get("skip_rates") or {}
    return mk.table(["", "value"], rows) + (
        mk.table(["filter", "skip rate"], [[k, f"{v:.1%}"] for k, v in skip.items()])
        if skip
        else ""
    )


def _fncheck(f: dict) -> str:
    if not f or not f.get("enabled", True) or "checked" not in f:
        return mk.note("targeted false-negative check: off (set fncheck.scorer)")
    keys = ("scorer", "kind", "action", "band", "checked", "confirmed", "dropped", "relabelled")
    return "<p>targeted false-negative check</p>" + mk.table(
        ["", "value"], [[k, mk.esc(f.get(k))] for k in keys if k in f]
    )


def _dedup(info: dict) -> str:
    if not info:
        return ""
    rows = [["exact duplicates merged", info.get("exact_duplicates", 0)]]
    if "semantic_duplicates" in info:
        rows.append(["semantic (SemDeDup) duplicates merged", info["semantic_duplicates"]])
    out = "<p>deduplication</p>" + mk.table(["", "docs"], rows)
    examples = info.get("semantic_examples") or []
    if examples:
        out += mk.table(
            ["doc", "merged into", "cosine", "doc text", "canonical text"],
            [[e["doc_id"], e["canonical_id"], e["cosine"], mk.esc(e["doc"][:120]),
              mk.esc(e["canonical"][:120])] for e in examples],
        )  # fmt: skip
    return out


def quality_section(d) -> str:
    m = d.manifest or {}
    return (
        _recall(m.get("index_recall") or {})
        + _quality(m.get("mining_quality") or {})
        + _fncheck(m.get("fncheck") or {})
        + _dedup(m.get("dedup") or {})
    )
