"""The Python API: one function per ``curate`` subcommand, for notebooks and scripts.

    import curate

    cfg = curate.load_config("configs/demo.yaml", ["output_dir=runs/nb"])
    result = curate.run(cfg)                       # curate run -c configs/demo.yaml
    curate.api.mine(cfg, ["mine.num_negatives=3"]) # curate mine ... --set mine.num_negatives=3
    curate.write_report("runs/nb")                 # curate report runs/nb

``config`` is a :class:`Config`, a YAML path, a plain dict or None (the defaults); ``overrides``
are ``KEY=VALUE`` strings as for ``--set``. Stage functions (embed ... evaluate) run the pipeline
up to and including their stage; every stage is cached, so calling them in order repeats nothing.
Heavy imports (torch, Dask, FAISS) happen on the first call, not on ``import curate``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from curate.config import Config, from_tree, load_config

ConfigLike = Config | str | Path | dict | None


def as_config(config: ConfigLike = None, overrides: Sequence[str] = ()) -> Config:
    """Any ConfigLike plus ``KEY=VALUE`` overrides -> a validated Config."""
    if config is None or isinstance(config, (str, Path)):
        return load_config(config, overrides)
    if isinstance(config, Config) and not overrides:
        return config  # validated when it was loaded; checking again would repeat its warnings
    return from_tree(config.to_dict() if isinstance(config, Config) else dict(config), overrides)


def run(
    config: ConfigLike = None,
    overrides: Sequence[str] = (),
    quiet: bool = False,
    stop_after: str = "eval",
) -> dict:
    """``curate run``: every stage (or up to ``stop_after``); -> the run's summary (report.json)."""
    from pipelines.run import run as run_pipeline

    return run_pipeline(as_config(config, overrides), quiet=quiet, stop_after=stop_after)


def embed(config: ConfigLike = None, overrides: Sequence[str] = (), quiet: bool = False) -> dict:
    """``curate embed``: read and embed corpus and queries (cached per partition)."""
    return run(config, overrides, quiet, stop_after="embed")


def index(config: ConfigLike = None, overrides: Sequence[str] = (), quiet: bool = False) -> dict:
    """``curate index``: ... and build the FAISS index (checked by the recall guard)."""
    return run(config, overrides, quiet, stop_after="index")


def mine(config: ConfigLike = None, overrides: Sequence[str] = (), quiet: bool = False) -> dict:
    """``curate mine``: ... and mine and filter hard negatives."""
    return run(config, overrides, quiet, stop_after="mine")


def batch(config: ConfigLike = None, overrides: Sequence[str] = (), quiet: bool = False) -> dict:
    """``curate batch``: ... and compose batches, write shards and manifest."""
    return run(config, overrides, quiet, stop_after="batch")


def train(config: ConfigLike = None, overrides: Sequence[str] = (), quiet: bool = False) -> dict:
    """``curate train``: ... and train on the shards."""
    return run(config, overrides, quiet, stop_after="train")


def evaluate(config: ConfigLike = None, overrides: Sequence[str] = (), quiet: bool = False) -> dict:
    """``curate eval``: every stage, ending with base vs trained on the held-out split."""
    return run(config, overrides, quiet, stop_after="eval")


def validate(config: ConfigLike = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """``curate validate``: check the config, the model folders and the dataset; run nothing.
    -> {"config": Config, "model": resolved model folder, "stats": what the reader found,
    "effective": the settings the run will decide for itself
    (curate.effective.planned_settings)}."""
    from curate import config_rules, storage
    from curate.effective import planned_settings
    from curate.embed import encoder as embed_mod
    from curate.mine import fncheck
    from curate.read.dataset import read_dataset
    from curate.read.stage import resolve_data, train_pairs

    cfg = as_config(config, overrides)
    storage.check_output(cfg, storage.output_folder(cfg))  # `run` would refuse it: say so here
    model = embed_mod.check_model(cfg.embed)  # remote code too, not only config.json
    fncheck.resolve_scorers(cfg)
    ds = read_dataset(resolve_data(cfg), options=cfg.storage.options)
    pairs = train_pairs(ds, cfg)
    config_rules.check_data(cfg, pairs.height)
    stats = {**ds.stats, "train_pairs": pairs.height, "train_queries": pairs["query_id"].n_unique()}
    return {"config": cfg, "model": model, "stats": stats, "effective": planned_settings(cfg)}


def write_report(out: str | Path, path: str | Path | None = None) -> Path:
    """``curate report OUTDIR``: write OUTDIR/report.html (or ``path``); -> its path."""
    from curate.report.page import write_report as write

    return write(out, path)


def loop(
    config: ConfigLike = None,
    rounds: int = 2,
    overrides: Sequence[str] = (),
    quiet: bool = False,
    keep_going: bool = False,
) -> list[dict]:
    """``curate loop``: retrain ``rounds`` times, mining each round with the last round's model,
    stopping after a round worse than the best so far unless ``keep_going``; -> one row per round
    (round 0: the base model) with the held-out metrics (loop.json names the best model)."""
    from pipelines.loop import loop as run_loop

    return run_loop(as_config(config, overrides), rounds, quiet=quiet, keep_going=keep_going)


def export(
    run_dir: str | Path,
    format: str = "sentence-transformers",
    to: str | Path | None = None,
    num_negatives: int | None = None,
    short: str = "drop",
    overwrite: bool = False,
) -> dict:
    """``curate export``: the shards of ``run_dir`` in another trainer's format, each row with
    ``num_negatives`` negatives (default: the run's mine.num_negatives); rows short of them are
    dropped or filled (``short``: drop | repeat, see curate.batch.export) -> the counts, with
    ``path`` (the export) and ``counts`` (the file beside it that holds them)."""
    from curate import outdir
    from curate.batch import export as exp
    from curate.batch.shards import read_manifest
    from curate.errors import CurateError

    shard_dir = Path(run_dir) / "shards"
    read_manifest(shard_dir)  # no manifest (or an old one): say so before writing anything
    dest = Path(to) if to else Path(run_dir) / "export" / format
    if to:  # another program's files there are refused unless overwrite (the default: curate's)
        outdir.check_export(dest, overwrite)
    where = {"counts": str(exp.counts_path(dest))}
    if format == "sentence-transformers":
        counts = exp.to_sentence_transformers(shard_dir, dest, num_negatives, short)
        return {"path": str(dest), **where, **counts}
    if format == "flagembedding":
        counts = exp.to_flagembedding(shard_dir, dest, num_negatives, short)
        return {"path": str(exp.flagembedding_file(dest)), **where, **counts}
    raise CurateError(
        f"export format {format!r} unknown; choose sentence-transformers or flagembedding"
    )
