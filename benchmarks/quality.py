"""Quality benchmark (issue #5): does curate's data beat sentence-transformers' mined data?

Every arm starts from the packaged all-MiniLM-L6-v2 (offline) and trains the same number of
optimizer steps with the same batch size, lr, warmup, weight decay, temperature, max length and
seeds; every arm is scored by the same evaluator (curate's Encoder, exact search, test qrels).

    A          base model, no training
    B-st       in-batch negatives only, random batches: sentence-transformers MNRL (plain)
    B-curate   the same data through curate's trainer (random batches, no negatives, no masks)
    C-default  sentence-transformers mine_hard_negatives with its defaults + MNRL
    C-nv       mine_hard_negatives with the NV-Retriever settings its docs recommend + MNRL
    D          curate in full: mined + filtered negatives, topic-spread batches, masks
    E-nomask   D without the mask (train.mask: false)
    E-notopic  D without topic handling (batch.topics: off)
    D-*        ablations of D (quality_arms.VARIANTS), e.g. D-cluster: the TAS-style topic batches

    .venv/bin/python benchmarks/quality.py ../shared/data/cranfield
    .venv/bin/python benchmarks/quality.py ../shared/data/squad-v1.1-dev
    .venv/bin/python benchmarks/quality.py ../shared/data/cranfield --seeds 0 --steps 3 --no-docs

Finished runs are kept under --work (keyed by the settings), so an interrupted benchmark resumes.
Writes docs/quality-<dataset>.json, the dataset's block of docs/quality.md and docs/quality.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("CURATE_NO_PROGRESS", "1")

import numpy as np  # noqa: E402
import quality_arms as arms  # noqa: E402
import quality_report as report  # noqa: E402
from batch_stats import batch_stats  # noqa: E402
from quality_data import (  # noqa: E402  # noqa: E402
    BASE_MODEL,
    Bench,
    FnCounter,
    evaluate_model,
    evaluate_with_st,
    hide_positives,
    in_batch_fn,
    load_bench,
)

log = logging.getLogger("quality")
# Goal arms first: a run cut short still answers "does D beat C".
ARMS = ("A", "C-nv", "D", "C-default", "E-nomask", "E-notopic", "B-st", "B-curate")
CURATE_ARMS = ("D", "E-nomask", "E-notopic", *arms.VARIANTS)


def library_fingerprint() -> dict:
    """Where curate, pipelines and train were imported from and a hash of their sources: the
    benchmark may run from a frozen copy of the checkout while others edit it."""
    import hashlib

    import curate
    import pipelines
    import train

    h, where = hashlib.blake2b(digest_size=8), {}
    for mod in (curate, pipelines, train):
        folder = Path(list(mod.__path__)[0])  # pipelines and train are namespace packages
        where[mod.__name__] = str(folder)
        for f in sorted(folder.rglob("*.py")):  # the stage packages too
            h.update(str(f.relative_to(folder)).encode() + f.read_bytes())
    return {"sources": where, "hash": h.hexdigest()}


def first_ids(bench: Bench, texts: list[str]) -> list[str]:
    return [bench.ids_of_text[t][0] for t in texts]


def st_fn(bench: Bench, rows: list[dict], vecs: np.ndarray, hidden=None) -> dict:
    c = FnCounter(bench, vecs, hidden)
    for r in rows:
        c.add(bench.qids_of_text[r["anchor"]], first_ids(bench, r["negatives"]))
    return c.summary()


def shards_fn(bench: Bench, shard_dir: Path, vecs: np.ndarray, hidden=None) -> dict:
    c = FnCounter(bench, vecs, hidden)
    for q, negs in arms.shard_rows(shard_dir):
        c.add([q], negs)
    return c.summary()


def probe(bench: Bench, s: arms.Settings, vecs: np.ndarray, work: Path) -> dict | None:
    """Planted unlabelled positives: each miner sees the train qrels without a hidden 20% of each
    query's positives; -> per miner, the FN counts of its negatives against all positives."""
    from pipelines.run import run

    hidden = hide_positives(bench, s.hide_fraction, seed=0)
    if not hidden:
        return None  # every query has one positive (SQuAD): nothing to hide
    visible = [(q, d) for q, d in bench.pairs if d not in hidden.get(q, ())]
    qrels = work / "probe" / "qrels"
    qrels.mkdir(parents=True, exist_ok=True)
    lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t1" for q, d in visible]
    (qrels / "train.tsv").write_text("\n".join(lines) + "\n")
    out = {"hidden_positives": sum(map(len, hidden.values())), "queries_with_hidden": len(hidden)}
    cfg = arms.curate_config(
        bench,
        "D",
        0,
        s,
        work / "probe" / "curate",
        work / "cache",
        qrels_dir=str(qrels),
        train=False,
    )
    run(cfg, quiet=True)
    out["D"] = shards_fn(bench, work / "probe" / "curate" / "shards", vecs, hidden)
    for arm in arms.ST_MINING:  # sentence-transformers' side does not change with curate's code
        def mine_st(arm=arm):
            rows = arms.st_mine(bench, visible, arm, s, work / "st-cache")
            return st_fn(bench, rows, vecs, hidden)

        st = cached(work / f"probe-st-{arm}.json", mine_st)
        out[arm] = st["value"]
    shutil.rmtree(work / "probe" / "curate", ignore_errors=True)
    return out


def train_arm(
    bench: Bench, arm: str, seed: int, s: arms.Settings, work: Path, st_rows: dict, vecs: np.ndarray
) -> tuple[Path, dict]:
    """Train one arm for one seed -> (model folder, facts about its training data)."""
    from curate.config import EmbedConfig
    from pipelines.run import run
    from train.train import train

    out = work / "runs" / arm / f"seed{seed}"
    shutil.rmtree(out, ignore_errors=True)  # curate's trainer would resume a stale checkpoint
    if arm in CURATE_ARMS:
        cfg = arms.curate_config(bench, arm, seed, s, out, work / "cache")
        result = run(cfg, quiet=True)
        shard_dir = out / "shards"
        facts = {
            "funnel": result["manifest"]["funnel"],
            "counts": result["manifest"]["counts"],
            "mined_fn": shards_fn(bench, shard_dir, vecs),
            "in_batch_fn": in_batch_fn(bench, arms.curate_batches(shard_dir, cfg.train, s.steps)),
            "batch_stats": batch_stats(shard_dir, s.steps),  # the batches the trainer took
        }
        return Path(result["model"]), facts
    if arm == "B-curate":
        arms.random_shards(bench, out / "shards", s.batch_size, seed)
        cfg = arms.curate_config(bench, arm, seed, s, out, work / "cache").train
        cfg = dataclasses.replace(cfg, mask=False)  # plain in-batch InfoNCE: nothing to mask

        model = train(out / "shards", out / "model", Path(BASE_MODEL), cfg, EmbedConfig(), seed)
        return model, {
            "in_batch_fn": in_batch_fn(bench, arms.curate_batches(out / "shards", cfg, s.steps))
        }
    rows = (
        st_rows[arm]
        if arm in st_rows
        else [
            {"anchor": bench.qtext[q], "positive": bench.doc_text[bench.doc_row[d]]}
            for q, d in bench.pairs
        ]
    )
    model, batches = arms.st_train(rows, out, seed, s, no_duplicates=arm != "B-st")
    return model, {"in_batch_fn": in_batch_fn(bench, arms.st_batches(bench, rows, batches))}


def run_one(bench, arm, seed, s, work, st_rows, vecs, report_only=False) -> dict | None:
    done = work / "results" / f"{arm}-seed{seed}.json"
    library = library_fingerprint()["hash"]
    if done.is_file():
        res = json.loads(done.read_text())
        # curate's arms are redone when curate's code changed since; the others use only its
        # evaluator, which the base-model check (curate vs sentence-transformers) guards
        same = res.get("library") == library and res.get("d_max_relative") == s.d_max_relative
        if report_only or arm not in CURATE_ARMS + ("B-curate",) or same:
            return res
        log.info("%s seed %d: curate changed since it ran, training it again", arm, seed)
    if report_only:
        return None
    t0, load = time.perf_counter(), os.getloadavg()[0]
    model, facts = train_arm(bench, arm, seed, s, work, st_rows, vecs)
    t1 = time.perf_counter()
    metrics, _ = evaluate_model(bench, model, s.max_length)
    t2 = time.perf_counter()
    res = {
        "arm": arm,
        "seed": seed,
        "metrics": metrics,
        "train_s": round(t1 - t0, 1),
        "eval_s": round(t2 - t1, 1),
        "loadavg": [load, os.getloadavg()[0]],
        "library": library,
        "d_max_relative": s.d_max_relative,
        **facts,
    }
    log.info("%s seed %d: %s (train %.0fs, eval %.0fs)", arm, seed, metrics, t1 - t0, t2 - t1)
    shutil.rmtree(work / "runs" / arm / f"seed{seed}", ignore_errors=True)
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(res, indent=1))
    return res


def cached(path: Path, make):
    """JSON-cached setup step (base evaluation, probe, mining): computed once per settings."""
    if path.is_file():
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    value = make()
    value = {"value": value, "seconds": round(time.perf_counter() - t0, 1)}
    path.write_text(json.dumps(value))
    return value


def setup(bench: Bench, s: arms.Settings, arm_names, work: Path):
    """Base model evaluation (arm A), the FN probe and sentence-transformers' mining -> (facts,
    base doc vectors, mined rows per C arm)."""
    vec_path = work / "base_vecs.npy"

    def base():
        metrics, vecs = evaluate_model(bench, Path(BASE_MODEL), s.max_length)
        np.save(vec_path, vecs)
        return {
            "curate_encoder": metrics,
            "sentence_transformers": evaluate_with_st(bench, Path(BASE_MODEL), s.max_length),
        }

    b = cached(work / "base.json", base)
    vecs = np.load(vec_path)
    out = {
        "base": b["value"]["curate_encoder"],
        "base_via_sentence_transformers": b["value"]["sentence_transformers"],
        "setup_s": {"base": b["seconds"]},
        "st_mining": {},
    }
    log.info(
        "A (base): %s; via sentence-transformers: %s",
        out["base"],
        out["base_via_sentence_transformers"],
    )
    # curate's miner takes part in the probe: keyed by curate's sources as well
    probe_file = work / f"probe-{library_fingerprint()['hash']}-{s.d_max_relative}.json"
    p = cached(probe_file, lambda: probe(bench, s, vecs, work))
    out["probe"], out["setup_s"]["probe"] = p["value"], p["seconds"]
    st_rows = {}
    for arm in arms.ST_MINING:
        if arm in arm_names:
            m = cached(
                work / f"st-rows-{arm}.json",
                lambda arm=arm: arms.st_mine(bench, bench.pairs, arm, s, work / "st-cache"),
            )
            st_rows[arm] = m["value"]
            out["setup_s"][f"mine {arm}"] = m["seconds"]
            out["st_mining"][arm] = {
                "rows": len(st_rows[arm]),
                "pairs": len(bench.pairs),
                "mined_fn": st_fn(bench, st_rows[arm], vecs),
            }
    return out, vecs, st_rows


def benchmark(
    bench: Bench, s: arms.Settings, arm_names, seeds, work: Path, report_only=False
) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    out, vecs, st_rows = setup(bench, s, arm_names, work)
    out["runs"], out["missing"] = [], []
    for seed in seeds:  # seed-major: a cut-short run still has every arm for the first seeds
        for arm in arm_names:
            if arm == "A":  # deterministic: the same numbers for every seed
                out["runs"].append(
                    {
                        "arm": "A",
                        "seed": seed,
                        "metrics": out["base"],
                        "train_s": 0.0,
                        "eval_s": 0.0,
                    }
                )
                continue
            try:
                r = run_one(bench, arm, seed, s, work, st_rows, vecs, report_only)
            except Exception:  # one failed arm must not lose the others' hours: log, go on
                log.exception("%s seed %d failed", arm, seed)
                r = None
            if r is None:
                out["missing"].append(f"{arm} seed {seed}")
            else:
                out["runs"].append(r)
    out["compute_s"] = round(
        sum(out["setup_s"].values()) + sum(r["train_s"] + r["eval_s"] for r in out["runs"]), 1
    )
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("data", help="a BEIR folder with qrels/train.tsv and qrels/test.tsv")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS + tuple(arms.VARIANTS),
                   help="the arms (default: the main ones); ablations of D: "
                   + ", ".join(arms.VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    d = arms.Settings()
    for name in (
        "steps",
        "batch_size",
        "num_negatives",
        "train_max_length",
        "max_length",
        "warmup_steps",
        "chunk_size",
    ):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument(
        "--d-max-relative", type=float, default=None,
        help="curate's mine.max_relative for D and E (chosen on the train split, docs/quality.md)",
    )
    p.add_argument("--work", default="/tmp/curate-quality", help="scratch (cache, runs, resume)")
    p.add_argument("--docs", default=str(Path(__file__).resolve().parents[1] / "docs"))
    p.add_argument("--no-docs", action="store_true", help="print the table only (smoke runs)")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: report the finished runs under --work",
    )
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    s = arms.Settings(
        steps=a.steps,
        batch_size=a.batch_size,
        num_negatives=a.num_negatives,
        train_max_length=a.train_max_length,
        max_length=a.max_length,
        lr=a.lr,
        warmup_steps=a.warmup_steps,
        d_max_relative=a.d_max_relative,
        chunk_size=a.chunk_size,
    )
    t0, load0 = time.time(), os.getloadavg()
    bench = load_bench(a.data)
    work = Path(a.work) / f"{bench.name}-{s.key()}"
    res = benchmark(bench, s, a.arms, a.seeds, work, a.report_only)
    res.update({
        "dataset": bench.name, "path": a.data, "settings": s.__dict__, "seeds": a.seeds,
        "arms": a.arms, "command": " ".join(
            [".venv/bin/python", "benchmarks/quality.py",
             *(x for x in argv or sys.argv[1:] if x != "--report-only")]
        ),
        "wall_s": round(time.time() - t0, 1), "loadavg_start": load0,
        "loadavg_end": os.getloadavg(), "cpus": os.cpu_count(), "train_pairs": len(bench.pairs),
        "test_queries": len(bench.test_qids),
        "docs": len(bench.doc_ids), "library": library_fingerprint(),
    })  # fmt: skip
    print(report.table(res))
    if not a.no_docs:
        report.write_docs(res, Path(a.docs))


if __name__ == "__main__":
    main()
