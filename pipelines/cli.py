"""The ``curate`` command line: ``curate run configs/demo.yaml`` and friends.

Stage subcommands (embed, index, mine, batch, train, eval) run the pipeline up to and including
their stage. Every stage caches what it wrote, so ``curate mine`` then ``curate batch`` repeats
nothing. ``curate.api`` (this package's ``api``) has one function per subcommand for
notebooks.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from curate import progress, storage
from curate.errors import CurateError
from pipelines import api

log = logging.getLogger("curate")

BEIR_HINT = (
    "curate run configs/default.yaml --set data.path=../shared/data/cranfield "
    "--set data.empty_text=skip --set output_dir=runs/cranfield"
)
EPILOG = """\
config keys: configs/default.yaml lists every key with its default; --set overrides any of them
(values are YAML scalars: --set mine.max_relative=null). The config is validated before any
work starts: unknown keys get a did-you-mean, wrong types and out-of-range values are named."""
EXIT_HELP = """

exit status: 0 done (WARNING lines on stderr flag suspect data: few negatives kept, rows without
negatives, collapsed embeddings); 2 bad config or input, nothing run; 3 FAILURE: training made the
model worse than the base model on the held-out split (nDCG@10; report.json "verdict"
"worse_than_base"). For loop: 3 when no round beat the base model (the base model is kept)."""
WORSE = 3  # exit status: the trained model scored below the base model


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default; descriptions keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text
            or action.default is argparse.SUPPRESS
            or not action.option_strings
            and action.nargs is None
        ):
            return text
        return text + " (default: %(default)s)"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "config_path", nargs="?", metavar="CONFIG", help="YAML config (same as -c; default: none)"
    )
    p.add_argument("-c", "--config", help="YAML config file (default: none, the built-in defaults)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set mine.num_negatives=7 (repeatable; default: none)",
    )
    p.add_argument(
        "--data",
        help="shortcut for --set data.path=PATH, a BEIR folder or demo (default: the config's)",
    )
    p.add_argument("--output", help="shortcut for --set output_dir=DIR (default: the config's)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an output folder that is neither empty nor a curate run, replacing "
        "files of the names curate writes (= --set overwrite=true; default: such a folder is "
        "refused)",
    )
    p.add_argument(
        "--scheduler",
        help="address of a Dask scheduler to join (default: the config's; none starts a "
             "LocalCluster)",
    )
    p.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="shortcut for --set train.processes=N: train on N data-parallel processes, one GPU "
        "each on CUDA (or run the command under torchrun --nproc-per-node N; default: the "
        "config's)",
    )
    _quiet(p)


def _quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress bars, warnings only (bars are also off when stderr is not a terminal)",
    )


def _overrides(args: argparse.Namespace) -> list[str]:
    sets = list(args.set)
    for key, val in (
        ("data.path", args.data),
        ("output_dir", args.output),
        ("cluster.scheduler", args.scheduler),
        ("train.processes", args.nproc),
    ):
        if val:
            sets.append(f"{key}={val}")
    if args.overwrite:
        sets.append("overwrite=true")
    return sets


def _config_path(args: argparse.Namespace) -> str | None:
    if args.config and args.config_path and args.config != args.config_path:
        raise CurateError(f"two configs given ({args.config_path} and -c {args.config}); pass one")
    return args.config or args.config_path


def _config(args: argparse.Namespace):
    return api.as_config(_config_path(args), _overrides(args))


def _print_result(result: dict) -> None:
    if "stopped_after" in result:
        print(
            f"stopped after: {result['stopped_after']}  (output in {result['output_dir']}; "
            "later stages reuse it)"
        )
    if "shards" in result:
        from curate.batch.shards import MANIFEST, manifest_path

        manifest = (f"{result['output_dir']}/{MANIFEST}" if storage.is_url(result["shards"])
                    else manifest_path(result["shards"]))  # fmt: skip
        print(f"shards:   {result['shards']}  (manifest: {manifest})")
        funnel = result["manifest"]["funnel"]
        print(
            f"funnel:   {funnel.get('candidates', 0):,} candidates -> {funnel.get('kept', 0):,} "
            "kept"
        )
    if "model" in result:
        print(f"model:    {result['model']}")
    for name, m in result.get("eval", {}).items():
        print(
            f"{name:8s}  nDCG@10 {m['ndcg@10']:.4f}  Recall@100 {m['recall@100']:.4f}  MRR@10 "
            f"{m['mrr@10']:.4f}"
        )
    print("timings:  " + ", ".join(f"{k} {v:.1f}s" for k, v in result["timings"].items()))


def _auto_report(out: str, args: argparse.Namespace) -> None:
    """The HTML report after a full run; a failure here never fails the finished run."""
    if args.no_report:
        return
    try:
        print(f"report:   {api.write_report(out)}")
    except Exception as err:  # the run's results are on disk already: say so, don't crash
        log.warning(
            "report.html not written (%s: %s); retry with: curate report %s",
            type(err).__name__,
            err,
            out,
        )


def _print_warnings(warnings: list[dict]) -> None:
    """The run's warnings as the last lines, on stderr, so neither -q nor a pipe hides them."""
    from curate.health import format_lines

    sys.stdout.flush()  # after the results, also when both streams go to one terminal
    for line in format_lines(warnings):
        print(line, file=sys.stderr)


def cmd_run(args) -> int:
    cfg = _config(args)
    if int(os.environ.get("RANK", "0")) > 0:  # torchrun: rank 0 runs the stages, the rest train
        if args.stage in ("train", "eval") and cfg.train.enabled:
            from train.train import follow_run

            follow_run(cfg)
        return 0
    result = api.run(cfg, quiet=args.quiet, stop_after=args.stage)
    _print_result(result)
    if "stopped_after" not in result:
        print(f"summary:  {result['output_dir']}/report.json")
        out = storage.output_folder(cfg)  # for a URL output_dir its staging folder, then uploaded
        _auto_report(str(out), args)
        storage.put_back(cfg, out, ["report.html"])
    if cfg.data.path == "demo" and args.stage == "eval":
        print(f"\nThe same pipeline on a BEIR folder:\n  {BEIR_HINT}")
    _print_warnings(result.get("warnings") or result.get("manifest", {}).get("warnings") or [])
    return WORSE if result.get("verdict") == "worse_than_base" else 0


def _flat(stats: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for key, val in stats.items():
        out += _flat(val, f"{prefix}{key}.") if isinstance(val, dict) else [(prefix + key, val)]
    return out


def cmd_validate(args) -> int:
    path, sets = _config_path(args), _overrides(args)
    found = api.validate(path, sets)
    cfg = found["config"]
    print(
        f"config ok: {path or 'built-in defaults'}"
        + (f" with {len(sets)} override(s)" if sets else "")
    )
    print(f"  output_dir: {cfg.output_dir}")
    print(f"  model: {cfg.embed.model} ({found['model']})")
    ceiling = (
        f"max_relative {cfg.mine.max_relative} x {cfg.mine.ceiling_from} known positive"
        if cfg.mine.calibrate_ceiling is None
        else f"max_relative calibrated on known positives (FN <= {cfg.mine.calibrate_ceiling:.1%})"
    )
    print(
        f"  mine: top_k {cfg.mine.top_k}, num_negatives {cfg.mine.num_negatives}, "
        f"window [{cfg.mine.range_min}, {cfg.mine.range_max}), {ceiling}"
    )
    b = cfg.batch
    topics = {"spread": f"spread (at most {b.topic_cap or 'ceil(batch_size / n_topics)'} rows "
                        "of a topic per batch)",
              "cluster": f"cluster (same_topic {b.same_topic})", "off": "off"}[b.topics]
    print(f"  batch: batch_size {b.batch_size}, topics {topics}")
    print(f"  train: {'on' if cfg.train.enabled else 'off'}; eval split: {cfg.data.eval_split}")
    if found["effective"]:  # the manifest's "effective" will record the values used
        print("  decided at run time:")
    for e in found["effective"]:
        configured = "null" if e["configured"] is None else e["configured"]
        print(f"    {e['key']}: {e['decided']}; configured {configured}")
    print(f"data ok: {cfg.data.path}")
    for key, val in _flat(found["stats"]):
        print(f"  {key}: {val}")
    print("nothing was run.")
    return 0


def cmd_report(args) -> int:
    print(f"report:   {api.write_report(args.outdir, args.out)}")
    return 0


def cmd_loop(args) -> int:
    from pipelines.loop import format_table, loop_summary

    cfg = _config(args)
    table = api.loop(cfg, args.rounds, quiet=args.quiet, keep_going=args.keep_going)
    print(format_table(table))
    print(f"rounds:   {cfg.output_dir}/loop.json, {cfg.output_dir}/loop.png")
    summary = loop_summary(cfg.output_dir)
    print(f"model:    {summary.get('model')}  (round {summary.get('best_round')}, the best)")
    _auto_report(cfg.output_dir, args)
    _print_warnings(summary.get("warnings") or [])
    return WORSE if summary.get("best_round") == 0 else 0


def cmd_export(args) -> int:
    c = api.export(
        args.outdir, args.format, args.to, args.num_negatives, args.short, overwrite=args.overwrite
    )
    print(f"export:   {c['path']}  ({c['format']}, {c['num_negatives']} negatives per row)")
    print(
        f"rows:     {c['rows_in']:,} in -> {c['rows_written']:,} written, "
        f"{c['rows_dropped']:,} dropped, {c['rows_filled']:,} filled (--short {c['short']}; "
        f"{c['rows_without_negatives']:,} had no negatives)"
    )
    print(f"counts:   {c['counts']}")
    return 0


STAGE_HELP = {
    "run": "run every stage: embed, index, mine, batch, train, eval (writes report.html)",
    "embed": "read and embed corpus and queries (cached per partition)",
    "index": "run up to the FAISS index: embed, index",
    "mine": "run up to mined, filtered hard negatives: embed, index, mine",
    "batch": "run up to the shards: embed, index, mine, batch (shards + manifest)",
    "train": "run up to the trained model: ... batch, train",
    "eval": "run everything, ending with base vs trained on the held-out split (= run)",
}


def build_parser() -> argparse.ArgumentParser:
    from curate import __version__

    parser = argparse.ArgumentParser(prog="curate", description=__doc__, formatter_class=Formatter)
    parser.add_argument("--version", action="version", version=f"curate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_: str, fn, configured: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_,
            description=help_,
            formatter_class=Formatter,
            epilog=(EPILOG + (EXIT_HELP if fn in (cmd_run, cmd_loop) else ""))
            if configured
            else None,
        )
        p.set_defaults(fn=fn)
        return p

    for name, help_ in STAGE_HELP.items():
        p = add(name, help_, cmd_run)
        _common(p)
        p.set_defaults(stage="eval" if name == "run" else name)
        if name in ("run", "eval"):
            p.add_argument("--no-report", action="store_true", help="skip writing report.html")
    p = add(
        "loop", "retrain loop: mine with the last round's model, train again, evaluate", cmd_loop
    )
    _common(p)
    p.add_argument(
        "--rounds", type=int, default=2, help="training rounds (round 0 is the base model)"
    )
    p.add_argument(
        "--keep-going",
        action="store_true",
        help="run every round even after one scores below the best so far (default: stop there; "
        "loop.json names the best round's model either way)",
    )
    p.add_argument("--no-report", action="store_true", help="skip writing report.html")
    p = add("export", "write a run's shards in another trainer's format", cmd_export, False)
    p.add_argument("outdir", metavar="OUTDIR", help="run folder (output_dir) holding shards/")
    p.add_argument(
        "--format",
        choices=["sentence-transformers", "flagembedding"],
        default="sentence-transformers",
        help="target format",
    )
    p.add_argument("--to", metavar="PATH", help="destination (default: OUTDIR/export/FORMAT)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write to a --to PATH that holds other files than a curate export (default: refused)",
    )
    p.add_argument(
        "--num-negatives",
        type=int,
        metavar="N",
        help="negatives per row: sentence-transformers' negative_1..N columns, the fewest "
        "negatives a FlagEmbedding line may have (default: the run's mine.num_negatives)",
    )
    p.add_argument(
        "--short",
        choices=["drop", "repeat"],
        default="drop",
        help="rows with fewer than N negatives: drop leaves them out; repeat cycles their own "
        "negatives up to N (rows with none are dropped either way). Counts are printed and "
        "written beside the export (OUTDIR/export/FORMAT.json, or PATH.json)",
    )
    _quiet(p)
    p = add(
        "report",
        "write OUTDIR/report.html: funnel, scores, topics, batches, training, eval",
        cmd_report,
        False,
    )
    p.add_argument("outdir", metavar="OUTDIR", help="run folder (output_dir) or a loop's folder")
    p.add_argument(
        "-o", "--out", metavar="PATH", help="where to write the HTML (default: OUTDIR/report.html)"
    )
    _quiet(p)
    p = add(
        "validate",
        "check the config, model and dataset and print what was found; runs nothing",
        cmd_validate,
    )
    _common(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress.set_quiet(args.quiet)
    if not progress.enabled():  # transformers' own bars too, here and in the Dask workers
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("distributed").setLevel(logging.WARNING)  # its INFO lines drown ours
    for noisy in ("matplotlib", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.fn(args)
    except CurateError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted; rerun the same command to resume (finished work is cached)",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
