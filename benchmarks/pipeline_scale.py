"""The pipeline at scale: synthetic corpora of N docs with 384-d vectors given (no model), run
by the real ``curate run`` (train and eval off) on a LocalCluster and on a cluster started from
the command line, measured from outside.

Per N and cluster mode it records each stage's wall time (report.json "timings"), the peak
memory of the driver, of each worker and of the CLI scheduler (kernel high-water marks, see
``scale_harness``), the run's total wall time, and what passed through the scheduler
(``pipelines.traffic``'s meter, put on the scheduler by ``traffic_preload.py``). Results are
merged into docs/pipeline-scale.json by (N, mode), so a later run can add N = 10M, and plotted
to docs/pipeline-scale.png.

    .venv/bin/python benchmarks/pipeline_scale.py --sizes 100000 1000000 --modes local cli
    .venv/bin/python benchmarks/pipeline_scale.py --sizes 10000000 --modes local
    .venv/bin/python benchmarks/pipeline_scale.py --report-only

Corpora are generated once per N under --work (``scale_corpus``; 10M docs take ~16 GB of disk
and ~12 minutes); each run's output folder there is removed before it starts, since curate's
content-addressed caches would otherwise turn a rerun into a cache read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import yaml
from scale_cluster import (
    REPO,
    TRAFFIC_ENV,
    cli_cluster,
    fetch_traffic,
    metered,
    preload_env,
    traffic_fields,
    worker_env,
)
from scale_corpus import CorpusSpec, ensure_corpus
from scale_harness import TreeSampler, machine
from scale_report import merge_runs, plot, table

log = logging.getLogger("pipeline_scale")

MODES = ("local", "cli")
DEFAULT_JSON = REPO / "docs" / "pipeline-scale.json"
DEFAULT_PLOT = REPO / "docs" / "pipeline-scale.png"


def run_config(corpus: Path, out: Path, mode: str, address: str | None, workers: int) -> dict:
    """The run's config: vectors from the Parquet files, train and eval off, auto index."""
    cluster = (
        {"scheduler": address} if mode == "cli" else {"workers": "processes", "n_workers": workers}
    )
    return {
        "output_dir": str(out),
        "data": {
            "path": str(corpus),
            "corpus": str(corpus / "corpus.parquet"),
            "queries": str(corpus / "queries.parquet"),
            "eval_split": None,
            "columns": {"vector": "emb"},
        },
        # The recall guard raises nprobe instead of failing a long run at 10M.
        "index": {"factory": "auto", "recall_action": "raise_nprobe"},
        "train": {"enabled": False},
        "eval": {"enabled": False},
        "cluster": cluster,
    }


def check_vector_key() -> None:
    from curate.config import ColumnsConfig

    if "vector" not in {f.name for f in dataclasses.fields(ColumnsConfig)}:
        raise SystemExit(
            "this curate has no data.columns.vector (vectors given in the Parquet "
            "files); the benchmark needs it to skip the embed stage: update curate"
        )


def _driver(cfg_path: Path, sets: list[str], log_path: Path, env: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "curate", "run", str(cfg_path), "-q", "--no-report"]
    cmd += [a for s in sets for a in ("--set", s)]
    with open(log_path, "wb") as fh:
        # Its own session, so a timeout can stop it and the workers it started as one group.
        return subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
        )


def _wait(proc: subprocess.Popen, timeout: float | None) -> int | None:
    """The exit status, or None when it ran past ``timeout`` (then its group is killed)."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None


def _timed_run(
    cfg_path: Path, args: argparse.Namespace, env: dict, roots: dict[int, str], log_path: Path
) -> tuple[int | None, float, TreeSampler]:
    """``curate run`` with the memory of ``roots`` (the CLI cluster) and the driver's tree
    sampled; -> (exit status or None on timeout, wall seconds, the sampler)."""
    with TreeSampler(roots, every=args.every) as mem:
        t0 = time.perf_counter()
        proc = _driver(cfg_path, args.set, log_path, env)
        mem.add_root(proc.pid, "driver")
        status = _wait(proc, args.timeout or None)
        wall = time.perf_counter() - t0
        mem.sample()
    return status, wall, mem


def measure(spec: CorpusSpec, corpus: Path, mode: str, args: argparse.Namespace) -> dict:
    """One pipeline run of ``corpus`` in ``mode``, measured; -> its record."""
    run_dir = Path(args.work) / "runs" / f"n{spec.n_docs}-{mode}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    traffic_file = run_dir / "traffic.json"
    env = worker_env() | {TRAFFIC_ENV: str(traffic_file)}
    if mode == "local":  # its scheduler lives in the driver: reach it through dask's config
        env |= preload_env()
    cluster_cm = cli_cluster(run_dir / "cluster", args.workers) if mode == "cli" else nullcontext()
    with cluster_cm as cluster:
        cfg = run_config(corpus, run_dir / "out", mode, cluster and cluster.address, args.workers)
        cfg_path = run_dir / "config.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        roots = cluster.roots() if cluster else {}
        status, wall, mem = _timed_run(cfg_path, args, env, roots, run_dir / "driver.log")
        record = cluster and status == 0 and fetch_traffic(cluster.address)
    if mode == "local" and traffic_file.is_file():
        record = json.loads(traffic_file.read_text())
    report = _report_fields(run_dir / "out")
    if not args.keep_output:  # at 10M a run writes ~35 GB (vectors twice, the index)
        shutil.rmtree(run_dir / "out", ignore_errors=True)
    return {
        "n_docs": spec.n_docs,
        "n_queries": spec.n_queries,
        "mode": mode,
        "factory": chosen_factory(cfg_path, args.set, spec.n_docs, spec.dim),
        "status": "ok" if status == 0 else "timeout" if status is None else f"exit {status}",
        "wall_s": round(wall, 2),
        **report,
        **mem.summary(),
        **traffic_fields(record or None),
        "traffic_note": _traffic_note(record, status),
        "driver_log_tail": None if status == 0 else _tail(run_dir / "driver.log"),
        "config": cfg,
        "sets": args.set,
    }


def _report_fields(out: Path) -> dict:
    path = out / "report.json"
    if not path.is_file():
        return {
            "timings": None,
            "driver_peak_mb_after": None,
            "stage_sum_s": None,
            "funnel": None,
            "counts": None,
            "index_recall": None,
            "warnings": None,
        }
    rep = json.loads(path.read_text())
    timings = rep.get("timings") or {}
    manifest = rep.get("manifest") or {}
    return {
        "timings": timings,
        "driver_peak_mb_after": rep.get("driver_peak_mb"),  # the driver's peak after each stage
        "stage_sum_s": round(sum(timings.values()), 2),
        "funnel": manifest.get("funnel"),
        "counts": manifest.get("counts"),
        "index_recall": manifest.get("index_recall"),
        "warnings": [w.get("code") for w in rep.get("warnings") or []],
    }


def chosen_factory(cfg_path: Path, sets: list[str], n_docs: int, dim: int) -> str:
    """The faiss factory the run's index settings give for this corpus (report.json does not
    say which one index.factory auto picked)."""
    from curate.config import load_config
    from curate.index.build import choose_factory

    return choose_factory(n_docs, dim, load_config(cfg_path, sets).index)


def _traffic_note(record: dict | None, status: int | None) -> str | None:
    if record:
        return None
    if not metered():
        return "not measured: this curate has no pipelines.traffic (the scheduler's meter)"
    return "not measured: the run failed before its scheduler closed"


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    ap.add_argument("--modes", nargs="+", choices=MODES, default=["local"])
    ap.add_argument(
        "--work",
        default="/work/bench/scale",
        help="corpora and run folders (never inside the repository)",
    )
    ap.add_argument("--json", default=str(DEFAULT_JSON), help="results, merged by (N, mode)")
    ap.add_argument("--plot", default=str(DEFAULT_PLOT))
    ap.add_argument("--report-only", action="store_true", help="re-plot and print from --json")
    ap.add_argument("--workers", type=int, default=2, help="worker processes in both modes")
    ap.add_argument("--every", type=float, default=0.2, help="memory sampling period, seconds")
    ap.add_argument("--timeout", type=float, default=0, help="per run, seconds; 0: none")
    ap.add_argument(
        "--keep-output",
        action="store_true",
        help="keep each run's output folder (default: removed once measured; its "
        "config and logs stay)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=100_000, help="docs per generated row group")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="passed to curate run (e.g. --set index.shards=4)",
    )
    args = ap.parse_args(argv)
    work = Path(args.work).resolve()
    if work == REPO or REPO in work.parents:
        ap.error(f"--work {work} is inside the repository; choose a folder outside it")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    statuses = []
    if not args.report_only:
        check_vector_key()
        command = (
            shlex.join([Path(sys.executable).name, *sys.argv])
            if argv is None
            else shlex.join(["pipeline_scale.py", *argv])
        )
        host = machine()
        for n in args.sizes:
            spec = CorpusSpec(n, seed=args.seed, chunk=min(args.chunk, _round_up(n)))
            corpus = ensure_corpus(Path(args.work), spec)
            gen_s = json.loads((corpus / "meta.json").read_text()).get("generate_s")
            for mode in args.modes:
                log.info("N=%d, %s cluster: running", n, mode)
                rec = measure(spec, corpus, mode, args)
                rec.update(
                    command=command,
                    machine=host,
                    corpus_generate_s=gen_s,
                    finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    # the box is shared: the load at the end says whether others ran meanwhile
                    load_average_at_end=[round(x, 2) for x in os.getloadavg()],
                )
                merge_runs(Path(args.json), [rec])
                statuses.append(rec["status"])
                log.info("N=%d, %s: %s, %.1fs", n, mode, rec["status"], rec["wall_s"])
    results = json.loads(Path(args.json).read_text())
    print(table(results["runs"]))
    plot(results["runs"], Path(args.plot))
    return 0 if all(s == "ok" for s in statuses) else 1


def _round_up(n: int, to: int = 10) -> int:
    return -(-n // to) * to


if __name__ == "__main__":
    sys.exit(main())
