"""Stage 1: read and validate the corpus, queries and known positives (qrels). Read-only.

Every problem raises a DataError naming the file, the row, what is wrong and the fix. Rows are
1-based line numbers for JSONL/TSV/CSV (the header is line 1) and 0-based row indices for Parquet.
JSONL and delimited files are decoded line by line here, not by polars, so that a malformed line or
bad UTF-8 can be named exactly. Any path may be a URL (s3://, gs://, ...): files are then streamed
through fsspec (curate.storage), and errors name the URL as the user wrote it.
"""

from __future__ import annotations

import csv
import difflib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from curate.config import ColumnsConfig, DataConfig
from curate.errors import DataError
from curate.storage import Location, Options, location

try:
    from orjson import loads as _loads
except ImportError:  # orjson is optional; json is slower but fine
    from json import loads as _loads

log = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".json", ".parquet", ".tsv", ".csv")
_CHUNK = 100_000  # rows held as Python lists before moving them into polars (bounds peak memory)
_LAYOUT = "a BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv)"


@dataclass(frozen=True)
class _Field:
    name: str  # canonical column name (curate.schema)
    key: str  # ColumnsConfig attribute that holds the input's column name
    role: str  # "id" | "text" | "title" | "score"


_FIELDS = {
    "corpus": [
        _Field("doc_id", "doc_id", "id"),
        _Field("title", "title", "title"),
        _Field("text", "text", "text"),
    ],
    "queries": [_Field("query_id", "query_id", "id"), _Field("text", "query_text", "text")],
    "qrels": [
        _Field("query_id", "qrels_query_id", "id"),
        _Field("doc_id", "qrels_doc_id", "id"),
        _Field("score", "qrels_score", "score"),
    ],
}


@dataclass(frozen=True)
class Dataset:
    corpus: pl.DataFrame  # doc_id, title ("" when absent), text: str (schema.CORPUS)
    queries: pl.DataFrame  # query_id, text: str (schema.QUERIES)
    qrels: dict[str, pl.DataFrame]  # split -> query_id, doc_id: str, score: f64 (schema.QRELS)
    stats: dict = field(default_factory=dict)


def _fail(path: Location, row: int | None, problem: str, fix: str) -> DataError:
    if row is not None:
        unit = "0-based Parquet row index" if path.suffix == ".parquet" else "1-based line number"
        problem = f"{problem} (row = {unit})"
    return DataError(str(path), problem, fix, row=row)


def _no_column(path: Location, f: _Field, col: str, found: Sequence, row: int | None) -> DataError:
    close = difflib.get_close_matches(col, [str(c) for c in found], n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    fix = f"rename it to {col!r} or set data.columns.{f.key}: {close[0] if close else '<name>'}"
    return _fail(path, row, f"no column {col!r} for {f.name} (found {list(found)}){hint}", fix)


def _lines(path: Location) -> Iterator[tuple[int, str]]:
    """(1-based line number, decoded line), decoding each line on its own to name bad bytes."""
    with path.open() as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problem = f"invalid UTF-8 at byte {e.start} of the line"
                raise _fail(path, lineno, problem, "re-encode the file as UTF-8") from None
            yield lineno, text.lstrip("\ufeff") if lineno == 1 else text


class _Columns:
    """Cells gathered per column as Python lists, moved into polars every _CHUNK rows; the
    loaders yield each full frame (``add`` returns it) so that a caller can stream them."""

    def __init__(self, fields: Sequence[_Field]):
        self.schema = {f.name: pl.String for f in fields} | {"_row": pl.Int64}
        self.rows: list[list] = []
        self.yielded = False

    def add(self, row: int, values: list) -> pl.DataFrame | None:
        self.rows.append([*values, row])
        return self.flush() if len(self.rows) >= _CHUNK else None

    def flush(self) -> pl.DataFrame:
        frame = pl.DataFrame(self.rows, schema=self.schema, orient="row")
        self.rows, self.yielded = [], True
        return frame

    def last(self) -> Iterator[pl.DataFrame]:
        """The rows left over; an empty frame when nothing was yielded (an empty file)."""
        if self.rows or not self.yielded:
            yield self.flush()


def _cell(path: Location, row: int, f: _Field, col: str, obj: dict) -> str | None:
    if col not in obj:
        if f.role == "title":
            return ""
        raise _no_column(path, f, col, list(obj), row)
    value = obj[col]
    if value is None or isinstance(value, str):
        return value  # null ids and scores are caught on the frame, null texts become ""
    if f.role == "score":
        return json.dumps(value)  # parsed as a number later, so true or [1] fail with their row
    fix = 'write ids as JSON strings, e.g. "_id": "1"' if f.role == "id" else "write strings"
    raise _fail(path, row, f"{f.name} {value!r} is a {type(value).__name__}, not a string", fix)


def _jsonl_chunks(path: Location, fields: Sequence[_Field], cols: ColumnsConfig
                  ) -> Iterator[pl.DataFrame]:
    names = [getattr(cols, f.key) for f in fields]
    out = _Columns(fields)
    for lineno, text in _lines(path):
        if not text.strip():
            continue  # blank lines (often a trailing one) hold no record
        try:
            obj = _loads(text)
        except ValueError as e:
            fix = "make every line one complete JSON object"
            raise _fail(path, lineno, f"malformed JSON ({e})", fix) from None
        if not isinstance(obj, dict):
            fix = 'make every line one JSON object, e.g. {"_id": "1", "text": "..."}'
            raise _fail(path, lineno, f"a JSON {type(obj).__name__}, not an object", fix)
        values = [_cell(path, lineno, f, c, obj) for f, c in zip(fields, names, strict=True)]
        if (full := out.add(lineno, values)) is not None:
            yield full
    yield from out.last()


def _delimited_chunks(path: Location, fields: Sequence[_Field], cols: ColumnsConfig
                      ) -> Iterator[pl.DataFrame]:
    sep = "\t" if path.suffix == ".tsv" else ","
    # BEIR TSVs are unquoted: a quote inside a TSV field is text, not the start of a quoted field.
    quoting = csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader((t for _, t in _lines(path)), delimiter=sep, quoting=quoting)
    out = _Columns(fields)
    try:
        header = [h.strip() for h in next(reader, [])]
        index = {}
        for f in fields:
            col = getattr(cols, f.key)
            if col in header:
                index[f.name] = header.index(col)
            elif f.role != "title":
                raise _no_column(path, f, col, header, 1)
        for record in reader:
            if not any(c.strip() for c in record):
                continue
            if len(record) != len(header):
                problem = f"{len(record)} fields where the header has {len(header)}"
                raise _fail(path, reader.line_num, problem, f"separate fields by {sep!r}")
            values = [record[index[f.name]].strip() if f.name in index else "" for f in fields]
            if (full := out.add(reader.line_num, values)) is not None:
                yield full
    except csv.Error as e:
        raise _fail(path, reader.line_num, f"unreadable row ({e})", "fix the quoting") from None
    yield from out.last()


def _parquet_chunks(path: Location, fields: Sequence[_Field], cols: ColumnsConfig
                    ) -> Iterator[pl.DataFrame]:
    """The file _CHUNK rows at a time: read whole, polars holds a second copy of every text
    while it converts the file."""
    # The columns curate reads, not the whole file: a vector column (data.columns.vector) is
    # read by worker tasks, never here (~1.5 KB a row at 384 dims).
    names: list[str] = []
    batches = iter(())
    start = 0
    while True:
        try:
            if not names:
                names = path.parquet_columns()
                wanted = [c for c in dict.fromkeys(getattr(cols, f.key) for f in fields)
                          if c in names]  # fmt: skip
                batches = path.parquet_batches(wanted, _CHUNK)
            raw = next(batches, None)
        except (OSError, ValueError, pl.exceptions.PolarsError) as e:  # pyarrow's: ValueError
            raise _fail(path, None, f"not a readable Parquet file ({e})", "rewrite it") from None
        if raw is None:
            return
        frame = _parquet_frame(path, fields, cols, names, raw, start)
        start += frame.height
        yield frame


def _parquet_frame(path: Location, fields: Sequence[_Field], cols: ColumnsConfig,
                   names: list[str], raw: pl.DataFrame, start: int) -> pl.DataFrame:
    exprs = []
    for f in fields:
        col = getattr(cols, f.key)
        if col not in raw.columns:
            if f.role != "title":
                raise _no_column(path, f, col, names, None)
            exprs.append(pl.lit("", pl.String).alias(f.name))
        elif f.role == "score":
            exprs.append(pl.col(col).alias(f.name))
        elif raw.schema[col] in (pl.String, pl.Null):
            exprs.append(pl.col(col).cast(pl.String).alias(f.name))
        else:  # casting ids would merge "01" and "1"; only the writer knows which was meant
            problem = f"column {col!r} is {raw.schema[col]}; {f.name} must be strings"
            raise _fail(path, None, problem, "store the column as strings")
    # ``_row`` last, as for the other formats: callers take the id from the first column.
    rows = pl.int_range(start, start + pl.len(), dtype=pl.Int64).alias("_row")
    return raw.select(exprs).with_columns(rows)


_CHUNKS = {".parquet": _parquet_chunks, ".tsv": _delimited_chunks, ".csv": _delimited_chunks}


def _first(frame: pl.DataFrame, mask: pl.Expr) -> dict | None:
    hit = frame.filter(mask).head(1)
    return hit.row(0, named=True) if hit.height else None


def _check(frame: pl.DataFrame, path: Location, kind: str, unique: bool = True) -> pl.DataFrame:
    """Checks common to every format: ids present and (``unique``: a streamed corpus checks
    that once all its chunks are read) unique, scores numeric."""
    id_cols = [f.name for f in _FIELDS[kind] if f.role == "id"]
    for col in id_cols:
        if bad := _first(frame, pl.col(col).is_null() | (pl.col(col).str.strip_chars() == "")):
            raise _fail(path, bad["_row"], f"{col} is null or empty", f"give every row an {col}")
    if kind != "qrels":
        (col,) = id_cols
        if unique:
            _check_unique(frame, path, col)
        # Only columns with nulls are rewritten: a copy of every text is the read's largest cost.
        nulls = [c for c in ("title", "text") if c in frame.columns and frame[c].null_count()]
        return frame.with_columns(pl.col(c).fill_null("") for c in nulls) if nulls else frame
    score = pl.col("score").cast(pl.Float64, strict=False)
    if bad := _first(frame.with_columns(p=score), ~pl.col("p").is_finite().fill_null(False)):
        problem = f"score {bad['score']!r} is not a finite number"
        raise _fail(path, bad["_row"], problem, "write scores as numbers, e.g. 1")
    return frame.with_columns(score)


def _check_unique(frame: pl.DataFrame, path: Location, col: str) -> None:
    # The row-by-row search only when some id repeats: its window over every id is a large
    # transient at corpus scale.
    if not frame.select(pl.col(col).is_duplicated().any()).item():
        return
    seen = frame.with_columns(first=pl.col("_row").min().over(col))
    if dup := _first(seen, pl.col("_row") != pl.col("first")):
        problem = f"duplicate {col} {dup[col]!r} (first at row {dup['first']})"
        raise _fail(path, dup["_row"], problem, f"make every {col} unique")


def _may_repeat(ids: pl.Series) -> bool:
    """Whether two of ``ids`` may be equal: their 64-bit hashes sorted and compared (16 bytes
    an id), where ``n_unique``'s hash table of every string added 370 MB to the driver at 10M
    ids. Equal hashes only send the caller to its exact check."""
    hashes = np.sort(ids.hash(0x5EED).to_numpy())
    return bool((hashes[1:] == hashes[:-1]).any())


def _is_in(values: pl.Series, ids: pl.Series) -> pl.Series:
    """``values.is_in(ids)`` with the hash set built over the smaller side: the qrels name ~1M
    distinct docs, and a set of a 10M-doc corpus's ids added 420 MB to the driver."""
    if ids.len() <= values.len():
        return values.is_in(ids.implode())
    wanted = values.unique()
    present = ids.filter(ids.is_in(wanted.implode()))
    return values.is_in(present.implode())


def _chunks(path: Location, kind: str, columns: ColumnsConfig) -> Iterator[pl.DataFrame]:
    """The file's rows, _CHUNK at a time, with the canonical columns plus ``_row``."""
    if kind not in _FIELDS:
        raise ValueError(f"kind must be one of {list(_FIELDS)}, got {kind!r}")
    if path.suffix not in SUFFIXES:
        raise _fail(path, None, f"unsupported file type {path.suffix!r}", f"use one of {SUFFIXES}")
    if not path.is_file():
        raise _fail(path, None, f"{kind} file not found", "check the path")
    return _CHUNKS.get(path.suffix, _jsonl_chunks)(path, _FIELDS[kind], columns)


def _read(path: Location, kind: str, columns: ColumnsConfig) -> pl.DataFrame:
    """Validated frame with the canonical columns plus ``_row`` (the row errors name)."""
    return _check(pl.concat(_chunks(path, kind, columns)), path, kind)


def _read_corpus(path: Location, cfg: DataConfig, sink: Callable[[pl.DataFrame], pl.DataFrame]
                 ) -> tuple[pl.DataFrame, pl.Series, int]:
    """The corpus streamed: each chunk checked, its empty texts dropped, then handed to ``sink``
    (-> what is kept of it, doc_id first); ids checked unique once all are read. -> (the kept
    chunks, the skipped ids, rows read). No frame of every text exists at once, and no second
    column of every id: the file is read again for the rows only when an id repeats."""
    kept, skipped, n_read = [], [], 0
    for chunk in _chunks(path, "corpus", cfg.columns):
        chunk = _check(chunk, path, "corpus", unique=False)
        n_read += chunk.height
        rows, gone = _drop_empty(chunk, path, cfg.empty_text, warn=False)
        kept.append(sink(rows))
        skipped.append(gone)
    corpus, gone = pl.concat(kept), pl.concat(skipped)
    ids = pl.concat([corpus["doc_id"], gone]) if gone.len() else corpus["doc_id"]
    if _may_repeat(ids):
        every = pl.concat(c.select("doc_id", "_row") for c in _chunks(path, "corpus", cfg.columns))
        _check_unique(every, path, "doc_id")
    if gone.len():
        log.warning("%s: skipped %d rows with empty text (first: %s)", path, gone.len(),
                    gone.head(5).to_list())  # fmt: skip
    return corpus, gone, n_read


def read_table(
    path: str | Path,
    kind: str,
    columns: ColumnsConfig | None = None,
    options: Options | None = None,
) -> pl.DataFrame:
    """One validated table; ``kind`` is "corpus", "queries" or "qrels". The suffix gives the
    format: .jsonl/.json (JSON lines), .parquet, .tsv, .csv. ``path`` may be a URL, reached with
    ``options`` (curate.storage)."""
    return _read(location(path, options), kind, columns or ColumnsConfig()).drop("_row")


# --- the dataset: files located, empty texts handled, qrels checked against the ids ----------


def _qrels_file(folder: Location, split: str, key: str) -> Location:
    found = [p for p in sorted(folder.iterdir()) if p.suffix in SUFFIXES]
    matches = [p for p in found if p.stem == split]
    if len(matches) > 1:
        problem = f"several qrels files for split {split!r}: {[p.name for p in matches]}"
        raise _fail(folder, None, problem, "keep one of them")
    if not matches:
        problem = f"no qrels file for split {split!r}; splits found: {[p.stem for p in found]}"
        raise _fail(folder, None, problem, f"set {key} to one of them or add {split}.tsv")
    return matches[0]


def _locate(
    cfg: DataConfig, splits: Sequence[str], options: Options | None
) -> tuple[Location, Location, dict[str, Location]]:
    """Every input path, checked before reading so a typo fails at once, not after the corpus."""
    root = location(cfg.path, options)
    if None in (cfg.corpus, cfg.queries, cfg.qrels_dir) and not root.is_dir():
        fix = f"set data.path to {_LAYOUT}, or set data.corpus, data.queries and data.qrels_dir"
        raise _fail(root, None, "data folder not found", fix)
    corpus = location(cfg.corpus, options) if cfg.corpus else root / "corpus.jsonl"
    queries = location(cfg.queries, options) if cfg.queries else root / "queries.jsonl"
    for path, key in ((corpus, "corpus"), (queries, "queries")):
        if not path.is_file():
            fix = f"set data.path to {_LAYOUT}, or data.{key} to a .jsonl or .parquet file"
            raise _fail(path, None, f"{key} file not found", fix)
    folder = location(cfg.qrels_dir, options) if cfg.qrels_dir else root / "qrels"
    if not folder.is_dir():
        fix = f"set data.path to {_LAYOUT}, or set data.qrels_dir"
        raise _fail(folder, None, "qrels folder not found", fix)
    keys = {cfg.train_split: "data.train_split", cfg.eval_split: "data.eval_split"}
    qrels = {s: _qrels_file(folder, s, keys.get(s, "the splits argument")) for s in splits}
    return corpus, queries, qrels


def _drop_empty(frame: pl.DataFrame, path: Location, mode: str, warn: bool = True
                ) -> tuple[pl.DataFrame, pl.Series]:
    """(kept rows, ids of skipped empty rows); raises instead when ``mode`` is "error"."""
    # A document is its title plus its text: an empty text under a real title is still a document.
    # Both parts whitespace-only, tested without building title + text for every row.
    blank = r"^\s*$"
    empty = pl.col("text").str.contains(blank)
    if "title" in frame.columns:
        empty = empty & pl.col("title").str.contains(blank)
    id_col = frame.columns[0]
    if mode == "error" and (bad := _first(frame, empty)):
        problem = f"{id_col} {bad[id_col]!r} has empty or whitespace-only text"
        fix = "fill in the text, or set data.empty_text: skip to drop such rows"
        raise _fail(path, bad["_row"], problem, fix)
    skipped = frame.filter(empty)[id_col]
    if skipped.len() and warn:
        head = skipped.head(5).to_list()
        log.warning("%s: skipped %d rows with empty text (first: %s)", path, skipped.len(), head)
    return (frame.filter(~empty) if skipped.len() else frame), skipped  # no copy when none is


def _nothing_left(path: Location, kind: str, rows: int) -> DataError:
    """A corpus or query file with no usable row."""
    if rows:
        problem = f"all {rows} rows have empty text and were skipped (data.empty_text: skip)"
        return _fail(path, None, problem, "fill in the texts, or point at another file")
    fix = f"point data.path (or data.{kind}) at a file holding the {kind}, one JSON object a line"
    return _fail(path, None, f"the {kind} file holds no rows", fix)


def _check_qrels(
    qrels: pl.DataFrame, path: Location, kept: dict[str, pl.Series], skipped: dict[str, pl.Series]
) -> tuple[pl.DataFrame, int]:
    """Drop pairs naming a skipped (empty) doc or query, then fail on any id never seen."""
    of_skipped = pl.repeat(False, qrels.height, dtype=pl.Boolean, eager=True)
    for col, ids in skipped.items():
        of_skipped = of_skipped | _is_in(qrels[col], ids)
    dropped = int(of_skipped.sum())
    if dropped:
        log.warning("%s: dropped %d pairs naming skipped empty docs or queries", path, dropped)
    qrels = qrels.filter(~of_skipped)
    for col, ids in kept.items():
        if bad := _first(qrels, ~pl.lit(_is_in(qrels[col], ids))):
            source = "corpus" if col == "doc_id" else "queries"
            problem = f"{col} {bad[col]!r} is not in the {source}"
            raise _fail(path, bad["_row"], problem, f"add it to the {source} or remove the row")
    return qrels, dropped


def read_dataset(
    cfg: DataConfig, splits: Sequence[str] | None = None, options: Options | None = None,
    corpus_sink: Callable[[pl.DataFrame], pl.DataFrame] | None = None,
) -> Dataset:
    """Corpus, queries and qrels of ``splits`` (default: train and eval split), validated.
    ``cfg.max_train_queries`` is left to the pipeline; ``options``: how its URLs are reached
    (the config's storage.options). ``corpus_sink``: the corpus is streamed through it a chunk
    of validated rows at a time and the Dataset's corpus is what it returns (the pipeline keeps
    ids and hashes, and writes the texts to a file)."""
    if splits is None:
        splits = [cfg.train_split] + ([cfg.eval_split] if cfg.eval_split is not None else [])
    corpus_path, queries_path, qrels_paths = _locate(cfg, list(dict.fromkeys(splits)), options)
    stats: dict = {}
    frames, kept, skipped = {}, {}, {}
    for name, kind, path in (("docs", "corpus", corpus_path), ("queries", "queries", queries_path)):
        if kind == "corpus" and corpus_sink is not None:
            frames[name], skipped_ids, n_read = _read_corpus(path, cfg, corpus_sink)
        else:
            full = _read(path, kind, cfg.columns)
            frames[name], skipped_ids = _drop_empty(full, path, cfg.empty_text)
            n_read = full.height
        if not frames[name].height:  # here, not later as ids the qrels name but nothing holds
            raise _nothing_left(path, kind, n_read)
        id_col = frames[name].columns[0]
        kept[id_col], skipped[id_col] = frames[name][id_col], skipped_ids
        stats |= {f"{name}_read": n_read, f"skipped_empty_{name}": skipped_ids.len()}
    qrels, stats["qrels"], stats["dropped_qrels_of_skipped"] = {}, {}, {}
    for split, path in qrels_paths.items():
        frame, dropped = _check_qrels(_read(path, "qrels", cfg.columns), path, kept, skipped)
        qrels[split] = frame.drop("_row")
        stats["qrels"][split], stats["dropped_qrels_of_skipped"][split] = frame.height, dropped
    docs, queries = frames["docs"].drop("_row", strict=False), frames["queries"].drop("_row")
    stats |= {"docs": docs.height, "queries": queries.height}
    log.info("read %d docs, %d queries, qrels %s", docs.height, queries.height, stats["qrels"])
    return Dataset(docs, queries, qrels, stats)
