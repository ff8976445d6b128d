"""The retrain loop: train -> re-embed with the new model -> re-index -> re-mine -> re-curate ->
train again, evaluating on the held-out split after every round.

Round r runs the whole pipeline under ``<output_dir>/round-<r>`` with round r-1's trained model as
both the mining model and the starting point of training. A round whose ``report.json`` exists is
complete and is not run again, so an interrupted loop resumes at round granularity. All rounds
share one embeddings cache, so the corpus embedded for round r's evaluation is reused by round
r+1's mining.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from curate import embed, outdir
from curate.config import Config
from curate.shards import write_json
from pipelines.run import resolve_data, run

log = logging.getLogger(__name__)

METRICS = ("ndcg@10", "recall@100", "mrr@10")


def loop(cfg: Config, rounds: int, quiet: bool = False) -> list[dict]:
    """-> one row per round (round 0 = the base model) with the held-out metrics."""
    root = Path(cfg.output_dir)
    outdir.check(root, cfg.overwrite)  # before the demo data or any round is written there
    embed.check_model(cfg.embed)
    base = dataclasses.replace(
        cfg, data=resolve_data(cfg), cache_dir=cfg.cache_dir or str(root / "cache"),
        train=dataclasses.replace(cfg.train, enabled=True),
    )
    model, table = cfg.embed.model, []
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
        model = result["model"]
        table.append({"round": r, "model": model, **_pick(result["eval"]["trained"])})
        write_json(root / "loop.json", {"rounds": table})
    plot(table, root / "loop.png")
    return table


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
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def format_table(table: list[dict]) -> str:
    lines = ["round  " + "  ".join(f"{k:>10s}" for k in METRICS)]
    for row in table:
        lines.append(f"{row['round']:5d}  " + "  ".join(f"{row[k]:10.4f}" for k in METRICS))
    return "\n".join(lines)
