"""The read stage's memory, step by step: the driver's resident set (VmRSS, sampled every
millisecond by a thread) before, at the peak of and after each step of ``curate.read.stage.read``
on a config's data. The read runs in the driver, so its peak is part of the driver's.

    .venv/bin/python benchmarks/read_memory.py /work/bench/scale/runs/n1000000-local/config.yaml

(a config written by benchmarks/pipeline_scale.py; any curate config works). Prints one line per
step call, in call order, in MB.
"""

from __future__ import annotations

import argparse
import functools
import threading
import time
from pathlib import Path

import yaml


def rss_mb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    return 0


class Sampler:
    def __init__(self) -> None:
        self.peak = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.001)

    def step(self, mod, name: str, lines: list[str]) -> None:
        fn = getattr(mod, name)

        @functools.wraps(fn)
        def timed(*a, **k):
            self.peak, before, t0 = 0, rss_mb(), time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                took = time.perf_counter() - t0
                time.sleep(0.01)  # one more sample after the step
                after = rss_mb()
                lines.append(f"{name:16s} before {before:6d} peak {self.peak:6d} after {after:6d}"
                             f"  {took:7.1f} s")

        setattr(mod, name, timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    args = ap.parse_args()
    from curate.config import config_from_dict
    from curate.read import dataset, stage
    from pipelines.cluster import arrow_system_allocator

    arrow_system_allocator()  # as the CLI does before the first Arrow buffer
    sampler, lines = Sampler(), []
    for name in ("_read_corpus", "_read", "_check_unique", "_check_qrels"):
        sampler.step(dataset, name, lines)
    for name in ("train_pairs", "known_positives"):
        sampler.step(stage, name, lines)
    cfg = config_from_dict(yaml.safe_load(Path(args.config).read_text()))
    start = rss_mb()
    read = stage.read(cfg)
    print(f"start {start} MB; {read.corpus.height} docs")
    print("\n".join(lines))
    print(f"held after read: {rss_mb()} MB")


if __name__ == "__main__":
    main()
