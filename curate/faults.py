"""Test-only crash injection: kill this process at a named point, to test resume and retries.

``CURATE_CRASH_AT=<point>:<n>[,<point>:<n>...]`` SIGKILLs the process the n-th time (1-based,
counted per process) it reaches ``point``. Points:

- ``embed`` / ``mine`` / ``index``: the driver saw its n-th task of that stage finish (its file is
  written);
- ``embed_task``: a worker embedded its n-th partition and has not written it yet (a lost worker);
- ``shard``: the driver renamed shard file n into place.

With ``CURATE_CRASH_ONCE=<dir>`` each point fires once across processes (a marker file in <dir>
records it), so a retried task or a rerun proceeds. Unset, every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import signal
from collections import Counter
from pathlib import Path

log = logging.getLogger(__name__)

ENV, ONCE_ENV = "CURATE_CRASH_AT", "CURATE_CRASH_ONCE"
_seen: Counter = Counter()


def arm(spec: str, once_dir: str | None = None) -> None:
    """Set (or, with spec "", clear) the crash points of this process and restart its counts; tests
    arm running Dask workers with ``client.run(faults.arm, spec, once_dir)``."""
    for name, value in ((ENV, spec), (ONCE_ENV, once_dir)):
        if value:
            os.environ[name] = value
        else:
            os.environ.pop(name, None)
    _seen.clear()


def reached(point: str) -> None:
    """Count one arrival at ``point``; SIGKILL this process if CURATE_CRASH_AT names it now."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    _seen[point] += 1
    targets = {tuple(item.strip().rsplit(":", 1)) for item in spec.split(",") if item.strip()}
    if (point, str(_seen[point])) not in targets:
        return
    if once := os.environ.get(ONCE_ENV):
        marker = Path(once) / f"{point}-{_seen[point]}"
        try:
            marker.touch(exist_ok=False)  # exclusive: of two racing workers, one dies
        except FileExistsError:
            return
    log.warning("fault injection: SIGKILL at %s:%d (pid %d)", point, _seen[point], os.getpid())
    os.kill(os.getpid(), signal.SIGKILL)
