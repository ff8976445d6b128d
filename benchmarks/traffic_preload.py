"""A Dask scheduler preload for ``benchmarks/pipeline_scale.py``: puts ``pipelines.traffic``'s
meter on the scheduler from its start and, when the scheduler closes, writes the meter's record
to the file named by $CURATE_BENCH_TRAFFIC_OUT.

``curate run`` starts its LocalCluster's scheduler inside its own process, so the benchmark has
no client on it to register a plugin with; the preload reaches it through dask's config
(``DASK_DISTRIBUTED__SCHEDULER__PRELOAD``), and the CLI scheduler through ``--preload``.
"""

from __future__ import annotations

import json
import os

from pipelines.traffic import TrafficMeter


def dask_setup(scheduler) -> None:
    meter = TrafficMeter()
    meter.scheduler = scheduler  # start() is not called for a plugin added after the start
    scheduler.add_plugin(meter)


def dask_teardown(scheduler) -> None:
    out = os.environ.get("CURATE_BENCH_TRAFFIC_OUT")
    meter = scheduler.plugins.get(TrafficMeter.name)
    if not out or meter is None:
        return
    with open(out + ".tmp", "w") as fh:
        json.dump(meter.record(), fh, indent=1, default=str)
    os.replace(out + ".tmp", out)
