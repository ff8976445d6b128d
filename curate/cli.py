"""The ``curate`` command line: ``curate run configs/demo.yaml`` and friends."""

from __future__ import annotations

import argparse
import logging
import sys

from curate import progress
from curate.config import load_config
from curate.errors import CurateError

log = logging.getLogger("curate")

BEIR_HINT = (
    "curate run configs/default.yaml --set data.path=../shared/data/cranfield "
    "--set data.empty_text=skip --set output_dir=runs/cranfield"
)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config_path", nargs="?", help="YAML config (same as -c)")
    p.add_argument("-c", "--config", help="YAML config file (default: built-in defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set mine.num_negatives=7 (repeatable)")
    p.add_argument("--data", help="shortcut for --set data.path=PATH (a BEIR folder)")
    p.add_argument("--output", help="shortcut for --set output_dir=DIR")
    p.add_argument("--scheduler", help="address of an existing Dask scheduler to join")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")


def _load(args: argparse.Namespace):
    sets = list(args.set)
    for key, val in (("data.path", args.data), ("output_dir", args.output), ("cluster.scheduler", args.scheduler)):
        if val:
            sets.append(f"{key}={val}")
    return load_config(args.config or args.config_path, sets)


def cmd_run(args) -> int:
    from pipelines.run import run

    cfg = _load(args)
    result = run(cfg, quiet=args.quiet)
    print(f"shards:   {result['shards']}  (manifest.json inside)")
    print(f"report:   {result['output_dir']}/report.json")
    if "model" in result:
        print(f"model:    {result['model']}")
    for name, m in result.get("eval", {}).items():
        print(f"{name:8s}  nDCG@10 {m['ndcg@10']:.4f}  Recall@100 {m['recall@100']:.4f}  MRR@10 {m['mrr@10']:.4f}")
    print("timings:  " + ", ".join(f"{k} {v:.1f}s" for k, v in result["timings"].items()))
    if cfg.data.path == "demo":
        print(f"\nThe same pipeline on a BEIR folder:\n  {BEIR_HINT}")
    return 0


def cmd_validate(args) -> int:
    from curate.read import read_dataset
    from pipelines.run import resolve_data

    cfg = _load(args)
    ds = read_dataset(resolve_data(cfg))
    print(f"config ok; data at {cfg.data.path}:")
    for key, val in ds.stats.items():
        print(f"  {key}: {val}")
    return 0


COMMANDS = {"run": (cmd_run, "run every stage"), "validate": (cmd_validate, "check data and config only")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="curate", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        _common(p)
        p.set_defaults(fn=fn)
    args = parser.parse_args(argv)
    progress.set_quiet(args.quiet)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return args.fn(args)
    except CurateError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
