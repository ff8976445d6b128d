"""Progress bars that stay quiet in logs: shown on a terminal, hidden under --quiet or non-TTY."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

from tqdm.auto import tqdm

_QUIET = False


def set_quiet(quiet: bool) -> None:
    global _QUIET
    _QUIET = quiet


def enabled() -> bool:
    return not _QUIET and sys.stderr.isatty() and not os.environ.get("CURATE_NO_PROGRESS")


def track(items: Iterable, total: int | None = None, desc: str = "") -> Iterable:
    return tqdm(items, total=total, desc=desc, disable=not enabled(), leave=False)
