"""The output folder rule: curate writes into an empty (or new) folder, or into one of its own.

A folder is curate's when it holds the marker a run writes when it starts (``.curate-run``) or,
for runs from before the marker, a shard manifest or ``report.json`` of curate's format, a retrain
loop's ``loop.json``, or the demo data curate generates there. Any other folder that is not empty
is refused before a file is created, unless ``overwrite`` is set: curate would replace files of
the names it writes (report.json, report.html, ...). Even then it deletes nothing it did not
write (curate.batch.shards removes only the shard files its own records list).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from curate.batch import shards
from curate.errors import OutputDirError
from curate.files import write_json

log = logging.getLogger(__name__)

MARKER = ".curate-run"
FORMAT = "curate-run/1"


def _json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def curate_sign(folder: Path) -> str | None:
    """The file that shows ``folder`` holds a curate run, or None."""
    folder = Path(folder)
    if (folder / MARKER).is_file():
        return MARKER
    # Older runs: the shard manifest (beside shards/ or, before that, inside it), the run summary.
    for path in (folder / shards.MANIFEST, folder / "shards" / shards.MANIFEST):
        if str(_json(path).get("format", "")).startswith("curate-shards"):
            return str(path.relative_to(folder))
    if {"output_dir", "timings"} <= _json(folder / "report.json").keys():
        return "report.json"
    if "rounds" in _json(folder / "loop.json"):
        return "loop.json"
    for marker in sorted(folder.glob(f"round-*/{MARKER}")):  # a retrain loop's folder
        return str(marker.relative_to(folder))
    readme = folder / "demo-data" / "README.md"
    if readme.is_file() and readme.read_text(encoding="utf-8").startswith("# curate demo dataset"):
        return "demo-data/"
    return None


def check(folder: Path, overwrite: bool = False, what: str = "output_dir") -> None:
    """Refuse a folder curate must not write into; creates nothing. ``what`` names the setting
    (or option) that chose the folder, for the message."""
    folder = Path(folder)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise OutputDirError(f"{what}: {folder} is a file, not a folder; pick a folder path")
    entries = sorted(p.name for p in folder.iterdir())
    if not entries or curate_sign(folder):
        return
    if overwrite:
        log.warning(
            "%s: writing into %s, which holds no curate run (overwrite is set)", what, folder
        )
        return
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    raise OutputDirError(
        f"{what}: {folder} is not empty "
        f"({len(entries)} {'entry' if len(entries) == 1 else 'entries'}: {shown}) and is not a "
        "curate run "
        f"(no {MARKER}, manifest or curate report.json), so curate would replace files there; "
        "pick an empty or new folder, or pass --overwrite (--set overwrite=true) to write into it "
        "anyway (files of the names curate writes are replaced; nothing else is deleted)"
    )


def _export_counts(path: Path) -> bool:
    """Is ``path`` the counts file a curate export wrote beside its output?"""
    return {"format", "num_negatives"} <= _json(path).keys()


def check_export(dest: Path, overwrite: bool = False) -> None:
    """``curate export --to DEST``: a new path, an empty folder, or a previous curate export
    (its counts file beside it, or its batches.json inside) is written; anything else is refused
    unless ``overwrite``. Creates nothing."""
    dest = Path(dest)
    counts = dest.with_name(f"{dest.stem if dest.suffix == '.jsonl' else dest.name}.json")
    ours = _export_counts(counts) or "batch_sizes" in _json(dest / "batches.json")
    if overwrite or ours:
        return
    if counts.exists():
        problem = f"{counts} exists and is not the counts of a curate export"
    elif dest.is_file():
        problem = f"{dest} exists and was not written by curate export"
    elif dest.is_dir() and any(dest.iterdir()):
        problem = f"{dest} is not empty and holds no curate export"
    else:
        return
    raise OutputDirError(
        f"--to: {problem}, so the export would replace files there; pick a new path or an empty "
        "folder, or pass --overwrite to write there anyway"
    )


def claim(folder: Path) -> None:
    """Create ``folder`` if needed and mark it as curate's (once validation has passed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / MARKER).is_file():
        from curate import __version__

        write_json(folder / MARKER, {"format": FORMAT, "curate": __version__})
