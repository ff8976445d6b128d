"""The whole pipeline, top to bottom: read -> embed -> index -> mine -> curate -> train -> evaluate.

This module is the stage list and nothing else: each stage is a function from records to a
record (curate.records; docs/architecture.md names each one's module), and ``run`` connects
them, times them and stops after the one asked for. Every stage's output lands under
``cfg.output_dir``; partitioned stages are content-addressed so a rerun (after a crash, or with a
changed later stage) repeats only what changed.
"""

from __future__ import annotations

import logging
import resource
import time
from contextlib import contextmanager
from pathlib import Path

from curate import health, outdir, storage
from curate.config import Config
from curate.embed import encoder
from curate.files import write_json
from curate.mine import fncheck
from curate.mine import stage as mine
from curate.read import stage as read_stage
from curate.records import Embedded, Model
from pipelines import stages
from pipelines.cluster import arrow_system_allocator, connect

log = logging.getLogger(__name__)

# The stages ``run(cfg, stop_after=...)`` can end after (the CLI's stage subcommands).
STAGES = ("embed", "index", "mine", "batch", "train", "eval")


class _Clock:
    """Seconds per stage, logged as each ends (report.json: timings), and this process's peak
    memory when each ended (report.json: driver_peak_mb): where the driver's memory went."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self.peak_mb: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - t0, 3)
        self.peak_mb[name] = round(peak_rss_mb(), 1)
        log.info("%s: %.1fs (driver peak %.0f MB)", name, self.timings[name], self.peak_mb[name])


def peak_rss_mb() -> float:
    """This process's peak RSS: the kernel's VmHWM, which exec resets. Not ru_maxrss: Linux
    carries the pre-exec peak into it, so a driver started by a large parent (a benchmark that
    generated the corpus) would report the parent's peak as its own."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run(cfg: Config, quiet: bool = False, stop_after: str = "eval") -> dict:
    """Every stage up to and including ``stop_after``; cached stages repeat nothing on a rerun.
    A run that stops early returns what it has (``stopped_after`` set) and writes no report.json."""
    if stop_after not in STAGES:
        raise ValueError(f"stop_after={stop_after!r}; choose one of {STAGES}")
    out, clock = storage.output_folder(cfg), _Clock()  # a URL's: a local staging folder
    check_before_writing(cfg, out)
    with clock("read"):
        read = read_stage.read(cfg)  # validation happens before anything is written
        fncheck.resolve_scorers(cfg)  # fncheck/teacher model folders, before any work
    model, work, cache = claim(cfg, out)

    def stop(stage: str, **got) -> dict:
        got = {"output_dir": str(out), "stopped_after": stage, "timings": clock.timings, **got}
        return storage.publish(cfg, out, got)  # a URL output_dir: uploaded, manifest last

    texts = read.corpus.height + read.dataset.queries.height
    with connect(cfg.cluster, quiet, texts=texts) as workers:
        with clock("embed"):  # or read from the inputs (data.columns.vector)
            emb = (stages.vectors_stage(workers, read, cfg, cache) if cfg.data.columns.vector
                   else stages.embed_stage(workers, read, model, cfg.embed, cache))
        if stop_after == "embed":
            return stop("embed")
        with clock("index"):
            index_fp = stages.index_stage(workers, work, cfg, read, model, emb)
        with clock("recall_guard"):  # approximate indexes: recall@k vs brute force
            indexed = stages.guard_stage(workers, work, index_fp, cfg, read, emb)
        if stop_after == "index":
            return stop("index")
        with clock("mine"):
            mined = stages.mine_stage(workers, cfg, read, emb, indexed)
        with clock("fncheck"):  # false-negative check, mining quality, teacher scores
            mined = mine.check(cfg, read, emb, indexed, mined, cache)
        if stop_after == "mine":
            return stop("mine")
        with clock("curate"):  # topics and batches in tasks, then the shards
            curated = stages.curate_stage(workers, cfg, out, read, emb, mined, work)
        result = {"output_dir": str(out), "shards": str(curated.shards),
                  "manifest": curated.summary, "effective": curated.summary["effective"]}
        if stop_after == "batch":
            return stop("batch", **result)
        if cfg.train.enabled:
            with clock("train"):
                result["model"] = str(stages.train_stage(cfg, out, model))
        if stop_after == "train":
            return stop("train", **result)
        if cfg.eval.enabled and cfg.data.eval_split:
            with clock("evaluate"):
                result["eval"] = stages.evaluate_stage(workers, cfg, read, cache, model,
                                                       result.get("model"))
    result["driver_peak_mb"] = clock.peak_mb
    return finish(cfg, out, result, clock.timings, emb)


def check_before_writing(cfg: Config, out: Path) -> None:
    """What can fail without reading the data, before anything is created."""
    storage.check_output(cfg, out)  # never another program's folder (or prefix)
    encoder.check_model(cfg.embed)  # a model that needs remote code fails here, not in a worker
    arrow_system_allocator()  # before the first Arrow buffer


def claim(cfg: Config, out: Path) -> tuple[Model, Path, Path]:
    """The base model resolved (a bad folder fails before any write), then the output folder
    marked as curate's; -> (model, work folder, embeddings cache)."""
    path = encoder.resolve_model(cfg.embed.model)
    model = Model(path, encoder.model_fingerprint(path))
    work = out / "work"
    outdir.claim(out)
    storage.claim(cfg, out)
    work.mkdir(parents=True, exist_ok=True)
    return model, work, storage.cache_folder(cfg, out)


def finish(cfg: Config, out: Path, result: dict, timings: dict, emb: Embedded) -> dict:
    """report.json: the result, the timings, the embedding rate and the run's warnings."""
    result["timings"] = timings
    # docs + queries over the whole embed stage, worker start-up and model loading included
    texts = len(emb.doc_ids) + len(emb.query_ids)
    result["texts_per_s"] = round(texts / max(timings["embed"], 1e-9), 1)
    result.update(health.assess(result, cfg.to_dict(), out))  # warnings, "worse_than_base"
    result = storage.named(cfg, out, result)
    write_json(out / "report.json", result)
    return storage.publish(cfg, out, result)
