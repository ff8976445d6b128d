"""Errors a user can act on: each names the input, the place in it, what is wrong and the fix."""

from __future__ import annotations


class CurateError(Exception):
    """Base of every error curate raises on purpose."""


class DataError(CurateError):
    """Bad input data: names the file, the row (1-based line for JSONL/TSV, 0-based row for
    Parquet), the problem and how to fix it."""

    def __init__(self, file: str, problem: str, fix: str, row: int | None = None):
        self.file, self.problem, self.fix, self.row = str(file), problem, fix, row
        where = f"{self.file}" + (f", row {row}" if row is not None else "")
        super().__init__(f"{where}: {problem}. Fix: {fix}")

    def __reduce__(self):  # rebuilt from its fields when it crosses processes (a Dask task)
        return type(self), (self.file, self.problem, self.fix, self.row)


class ConfigError(CurateError):
    """A config value that is unknown, of the wrong type or out of range, or settings that cannot
    work together. ``keys``: the dotted keys it is about; ``where`` (the key or section) and
    ``detail`` (what is wrong): the loader uses them to name where a value came from (the YAML
    file or a ``--set``)."""

    def __init__(self, message: str, keys: tuple[str, ...] = (), where: str = "",
                 detail: str | None = None):  # fmt: skip
        super().__init__(message)
        self.keys, self.where, self.detail = tuple(keys), where, detail or message

    def __reduce__(self):  # rebuilt from its fields when it crosses processes (a Dask task)
        return type(self), (str(self), self.keys, self.where, self.detail)


class OutputDirError(ConfigError):
    """An output folder curate must not write into: not empty and not a curate run."""


class StageMismatchError(CurateError):
    """Artifacts of two stages that do not belong together (other model, other dimension)."""


class NonFiniteEmbeddingError(StageMismatchError):
    """A model produced NaN/inf vectors, which no index or loss can use: names the model, the
    partition file and the ids whose vectors are not finite."""
