"""Settings a run decides for itself: what ``curate validate`` can tell before any work
(planned_settings), and what the run changed, for the manifest (effective_settings)."""

from __future__ import annotations

from curate.config import Config, MineConfig


def effective_settings(cfg: Config, mcfg: MineConfig, nprobe: int, cal,
                       index_recall: dict) -> list[dict]:
    """The settings the run decided for itself, each with the configured value, the one used
    and why (``config`` in the manifest keeps what was asked for); [] when none changed."""
    out = []
    if cal is not None and mcfg.max_relative != cfg.mine.max_relative:
        out.append({
            "key": "mine.max_relative", "configured": cfg.mine.max_relative,
            "used": mcfg.max_relative,
            "why": f"mine.calibrate_ceiling={cfg.mine.calibrate_ceiling}: the loosest ceiling "
                   f"whose leave-one-out false-negative rate meets the target ({cal.held_out} "
                   "known "
                   f"positives of {cal.queries} queries hidden in turn; ceiling_calibration)",
        })  # fmt: skip
    if nprobe != cfg.index.nprobe:
        tries = index_recall.get("attempts", [])
        why = (
            f"recall guard (index.recall_action=raise_nprobe): recall@{index_recall.get('k')} "
            f"{tries[0]['recall']} at nprobe {tries[0]['nprobe']} < index.recall_floor="
            f"{index_recall.get('floor')}; {index_recall.get('recall')} at {nprobe} (index_recall)"
            if len(tries) > 1
            else "HNSW searches with max(efSearch, nprobe) (index_recall)"
        )
        out.append(
            {"key": "index.nprobe", "configured": cfg.index.nprobe, "used": nprobe, "why": why}
        )
    return out


def planned_settings(cfg: Config) -> list[dict]:
    """What ``effective_settings`` may change, as ``curate validate`` can tell before any work:
    -> [{"key", "configured", "decided"}]."""
    out = []
    if cfg.mine.calibrate_ceiling is not None:
        out.append(
            {
                "key": "mine.max_relative",
                "configured": cfg.mine.max_relative,
                "decided": f"calibrated at run time (target {cfg.mine.calibrate_ceiling})",
            }
        )
    if cfg.index.recall_action == "raise_nprobe" and cfg.index.factory != "Flat":
        out.append({
            "key": "index.nprobe", "configured": cfg.index.nprobe,
            "decided": f"raised at run time while recall@{cfg.mine.top_k} < "
                       f"{cfg.index.recall_floor} (approximate indexes only; index.recall_action)",
        })  # fmt: skip
    return out
