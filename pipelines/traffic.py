"""What the Dask scheduler carries, per task-key prefix: a scheduler plugin that records each
task's argument size and result size, for the cluster test and the scale benchmark.

- argument bytes: the task's ``run_spec`` as the scheduler holds it (function, arguments, keyword
  arguments), pickled with distributed's own pickler, measured once when the task enters the
  scheduler. Every argument passes client -> scheduler -> worker, so this is what the scheduler
  carries for it (the meter pickles each task once more, on the scheduler: a cost while tasks
  carry data, nothing once they carry paths);
- result bytes: ``TaskState.nbytes`` when the task reaches memory, the size the worker reports
  for the result (dask's ``sizeof``). A result passes through the scheduler when the driver
  gathers it (``Client.gather``'s default outside a worker), not when a dependent task fetches
  it from a peer worker; counting every result makes ``total_bytes`` an upper bound.

The scheduler unpickles the plugin by reference, so ``pipelines.traffic`` must be importable
there (it is wherever curate is installed).

    register(client)  # client.register_plugin(TrafficMeter()), replacing an earlier meter
    ... run ...
    record = traffic(client)  # {"prefixes": {"embed": {...}, ...}, "total_bytes": ...}
"""

from __future__ import annotations

from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

NAME = "curate-traffic"


def key_prefix(key: Any) -> str:
    """curate's keys read "<stage>-<hash>[-<n>...]" -> "<stage>"; a tuple key by its first item.
    (dask's key_split would turn "index-shard-00000-of-00002.faiss-0-9" into "index-shard".)"""
    name = key[0] if isinstance(key, tuple) and key else key
    return str(name).split("-", 1)[0]


class TrafficMeter(SchedulerPlugin):
    """Per key: argument bytes (pickled run_spec) and result bytes (nbytes in memory). Keyed by
    task, so a task rerun after a lost worker is counted once, with its last result."""

    name = NAME
    idempotent = False  # registering again starts a fresh record

    def __init__(self) -> None:
        self.args: dict[Any, int] = {}
        self.results: dict[Any, int] = {}
        self.recomputed: dict[Any, int] = {}  # memory transitions after the first, per key
        self.scheduler = None

    async def start(self, scheduler) -> None:
        self.scheduler = scheduler

    def update_graph(self, scheduler, *, tasks: list, **kwargs: Any) -> None:
        from distributed.protocol.pickle import dumps

        self.scheduler = scheduler  # also where start() never ran (added by a preload)
        for key in tasks:
            ts = scheduler.tasks.get(key)
            if ts is not None and ts.run_spec is not None and key not in self.args:
                self.args[key] = len(dumps(ts.run_spec))

    def transition(self, key, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if finish != "memory" or self.scheduler is None:
            return
        ts = self.scheduler.tasks.get(key)
        if ts is None:
            return
        if key in self.results:
            self.recomputed[key] = self.recomputed.get(key, 0) + 1
        self.results[key] = int(ts.nbytes)

    def record(self) -> dict:
        """Plain dict: per prefix (see FIELDS) the task count, the largest and total argument and
        result bytes and the recomputed results; ``total_bytes`` over all prefixes."""
        prefixes: dict[str, dict[str, int]] = {}
        for key in self.args.keys() | self.results.keys():
            p = prefixes.setdefault(key_prefix(key), dict.fromkeys(FIELDS, 0))
            p["tasks"] += 1
            p["recomputed"] += self.recomputed.get(key, 0)
            _add(p, "arg", self.args.get(key, 0))
            if key in self.results:
                p["results"] += 1
                _add(p, "result", self.results[key])
        total = sum(p["arg_total"] + p["result_total"] for p in prefixes.values())
        return {"prefixes": dict(sorted(prefixes.items())), "total_bytes": total}


FIELDS = ("tasks", "arg_max", "arg_total", "results", "result_max", "result_total", "recomputed")


def _add(p: dict[str, int], what: str, nbytes: int) -> None:
    p[f"{what}_max"] = max(p[f"{what}_max"], nbytes)
    p[f"{what}_total"] += nbytes


def _scheduler_record(dask_scheduler) -> dict:
    meter = dask_scheduler.plugins.get(NAME)
    if meter is None:
        raise RuntimeError(
            f"no traffic meter on scheduler {dask_scheduler.address}: register one first "
            "with client.register_plugin(pipelines.traffic.TrafficMeter())"
        )
    return meter.record()


def _has_meter(dask_scheduler) -> bool:
    return NAME in dask_scheduler.plugins


def register(client) -> None:
    """A fresh meter on ``client``'s scheduler, replacing an earlier one and its record."""
    if client.run_on_scheduler(_has_meter):
        client.unregister_scheduler_plugin(NAME)  # else distributed warns that it overwrites
    client.register_plugin(TrafficMeter())


def traffic(client) -> dict:
    """The meter's record from ``client``'s scheduler, as a plain dict (see TrafficMeter.record)."""
    return client.run_on_scheduler(_scheduler_record)
