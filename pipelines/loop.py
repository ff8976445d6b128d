"""The retrain loop: train -> re-embed with the new model -> re-index -> re-mine -> re-curate ->
train again, evaluating on the held-out split after every round.

Round r runs the whole pipeline under ``<output_dir>/round-<r>`` with round r-1's trained model as
both the mining model and the starting point of training. A round whose ``report.json`` exists is
complete and is not run again, so an interrupted loop resumes at round granularity. All rounds
share one embeddings cache, so the corpus embedded for round r's evaluation is reused by round
r+1's mining.

The loop stops after a round whose trained model scores below the best round so far (nDCG@10 on
the held-out split) and keeps that best round's model: ``loop.json`` names it (``model``,
``best_round``; round 0 is the base model) with a warning saying which round made it worse.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from curate import health, outdir, storage
from curate.config import Config
from curate.embed import encoder as embed
from curate.errors import ConfigError
from curate.eval.metrics import METRICS
from curate.files import atomic_path, write_json
from curate.read.stage import resolve_data
from pipelines.run import run

log = logging.getLogger(__name__)

GUARD = "ndcg@10"  # a round below the best so far on this metric stops the loop


def loop(cfg: Config, rounds: int, quiet: bool = False, keep_going: bool = False) -> list[dict]:
    """-> one row per round (round 0 = the base model) with the held-out metrics; stops after a
    round worse than the best so far unless ``keep_going`` (loop.json names the best round's
    model either way)."""
    if storage.is_url(cfg.output_dir):
        raise ConfigError(f"curate loop: output_dir {cfg.output_dir} is a URL; a retrain loop "
                          "writes to a local folder only (copy its rounds up afterwards)")
    root = Path(storage.local_path(cfg.output_dir))
    outdir.check(root, cfg.overwrite)  # before the demo data or any round is written there
    embed.check_model(cfg.embed)
    base = dataclasses.replace(
        cfg,
        data=resolve_data(cfg),
        cache_dir=cfg.cache_dir or str(root / "cache"),
        train=dataclasses.replace(cfg.train, enabled=True),
    )
    model, table, warnings = cfg.embed.model, [], []
    for r in range(1, rounds + 1):
        rdir = root / f"round-{r}"
        done = rdir / "report.json"
        if done.is_file():
            result = json.loads(done.read_text())
            log.info("round %d already complete", r)
        else:
            rcfg = dataclasses.replace(
                base, output_dir=str(rdir), embed=dataclasses.replace(base.embed, model=model)
            )
            result = run(rcfg, quiet=quiet)
        if r == 1:
            table.append({"round": 0, "model": cfg.embed.model, **_pick(result["eval"]["base"])})
        best = max(table, key=lambda row: row[GUARD])  # the earliest of equals
        table.append({"round": r, "model": result["model"], **_pick(result["eval"]["trained"])})
        worse = table[-1][GUARD] < best[GUARD]
        if worse:
            warnings.append(_worse(table[-1], best, result, keep_going))
            log.warning("%s", warnings[-1]["message"])
        best, model = max(table, key=lambda row: row[GUARD]), result["model"]
        write_json(root / "loop.json", {"rounds": table, "best_round": best["round"],
                                        "model": best["model"], "warnings": warnings})  # fmt: skip
        if worse and not keep_going:
            break
    plot(table, root / "loop.png")
    return table


def _worse(row: dict, best: dict, result: dict, keep_going: bool) -> dict:
    """The stop: round ``row`` scored below ``best``; its own guard's causes if it has them."""
    causes = [c for w in result.get("warnings") or [] if w.get("code") == "worse_than_base"
              for c in w.get("likely_causes") or []]  # fmt: skip
    return health.warning(
        "loop_round_worse",
        f"round {row['round']} made the model worse: nDCG@10 {best[GUARD]:.3f} (round "
        f"{best['round']}) -> {row[GUARD]:.3f}; "
        + (
            "the loop goes on (keep_going), best so far: "
            if keep_going
            else "the loop stopped and "
        )
        + f"keeps round {best['round']}'s model"
        + (" (the base model)" if best["round"] == 0 else ""),
        causes,
        level="failure" if best["round"] == 0 else "warning",
    )


def loop_summary(root: str | Path) -> dict:
    """loop.json's choice: ``model`` and ``best_round`` (the last round for loops from before
    the guard), and ``warnings``."""
    path = Path(root) / "loop.json"
    got = json.loads(path.read_text()) if path.is_file() else {}
    rounds = got.get("rounds") or [{}]
    return {"model": got.get("model", rounds[-1].get("model")),
            "best_round": got.get("best_round", rounds[-1].get("round")),
            "warnings": got.get("warnings") or []}  # fmt: skip


def _pick(metrics: dict) -> dict:
    return {k: round(metrics[k], 5) for k in METRICS}


def plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    rounds = [row["round"] for row in table]
    for key in METRICS:
        ax.plot(rounds, [row[key] for row in table], marker="o", label=key)
    ax.set_xlabel("round (0 = base model)")
    ax.set_xticks(rounds)
    ax.set_ylabel("held-out score")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path, ".tmp.png") as tmp:  # the suffix tells savefig the format
        fig.savefig(tmp)
    plt.close(fig)


def format_table(table: list[dict]) -> str:
    lines = ["round  " + "  ".join(f"{k:>10s}" for k in METRICS)]
    for row in table:
        lines.append(f"{row['round']:5d}  " + "  ".join(f"{row[k]:10.4f}" for k in METRICS))
    return "\n".join(lines)
