"""The layering rule of docs/architecture.md, read from the source: the library (curate/) never
imports its wiring layer (pipelines/) or Dask, modules import no other module's private names,
and the report's modules import each other without a cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIBRARY = REPO / "curate"
# The package's entry points, above the library: the lazy API names and ``python -m curate``.
ENTRY = {LIBRARY / "__init__.py", LIBRARY / "__main__.py"}


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """Every import in ``path`` (at any depth): (module, names, line)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.module, [a.name for a in node.names], node.lineno))
    return found


def _library_files() -> list[Path]:
    return sorted(LIBRARY.rglob("*.py"))


def test_the_library_imports_neither_its_wiring_nor_dask():
    bad = [
        f"{p.relative_to(REPO)}:{line}: imports {mod}"
        for p in _library_files()
        if p not in ENTRY
        for mod, _, line in _imports(p)
        if mod.split(".")[0] in ("pipelines", "dask", "distributed")
    ]
    assert not bad, (
        "curate/ must not import pipelines/ or Dask (docs/architecture.md):\n" + "\n".join(bad)
    )


def test_importing_curate_loads_no_wiring():
    code = ("import sys, curate; print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('pipelines', 'dask')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         check=True)  # fmt: skip
    assert out.stdout.strip() == "[]"


def test_no_module_imports_another_modules_private_names():
    bad = [
        f"{p.relative_to(REPO)}:{line}: from {mod} import {name}"
        for root in ("curate", "pipelines", "train")
        for p in sorted((REPO / root).rglob("*.py"))
        for mod, names, line in _imports(p)
        if mod.split(".")[0] in ("curate", "pipelines", "train") and mod != _module(p)
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not bad, "\n".join(bad)


def test_the_report_modules_import_without_a_cycle():
    files = sorted((LIBRARY / "report").glob("*.py"))
    names = {_module(p) for p in files}

    def edges(p: Path) -> set[str]:  # ``from curate.report import sections`` counts too
        found = {m for m, _, _ in _imports(p)}
        found |= {f"{m}.{n}" for m, ns, _ in _imports(p) for n in ns}
        return found & names

    graph = {_module(p): edges(p) for p in files}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n}))
                   for n in graph.get(start, ()))  # fmt: skip

    cycles = [m for m in graph if reaches(m, m, set())]
    assert not cycles, f"import cycle through {cycles}"
