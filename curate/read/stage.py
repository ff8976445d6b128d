"""Stage 1 as one call: config -> Read (the dataset validated, train pairs, known positives,
doc texts), everything checked before the output folder is touched."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import polars as pl
import pyarrow as pa

from curate import config_rules, storage
from curate.batch import dedup
from curate.config import Config, DataConfig
from curate.mine.negatives import DOC_TEXTS
from curate.read import vectors
from curate.read.dataset import Dataset, read_dataset
from curate.records import Known, Read

TEXTS_FILE = "doc_texts.arrow"


def resolve_data(cfg: Config) -> DataConfig:
    """``data.path: demo`` -> the generated demo set (written once under the output folder);
    with given vectors (``data.columns.vector``) a BEIR folder's corpus and queries are Parquet."""
    if cfg.data.path != "demo":
        return vectors.parquet_inputs(cfg.data)
    from curate.read.synth import write_demo_dataset

    folder = storage.output_folder(cfg) / "demo-data"
    if not (folder / "corpus.jsonl").is_file():
        write_demo_dataset(folder, seed=cfg.seed)
    return dataclasses.replace(cfg.data, path=str(folder))


def doc_text_series(corpus: pl.DataFrame) -> pl.Series:
    """Title and text joined as BEIR models expect; the title alone is dropped when the text
    already starts with it (Cranfield repeats it). An Arrow-backed column: a Python list would
    hold one object per document in the driver."""
    title, text = pl.col("title").fill_null(""), pl.col("text").fill_null("")
    joined = pl.when((title == "") | text.str.starts_with(title)).then(text)
    return corpus.select(joined.otherwise(title + " " + text).alias("text"))["text"]


_PREFIX = "curate-texts-"


def _sweep_orphans() -> None:
    """Text folders of driver processes that no longer run (a killed run cannot clean up):
    removed, so crashes do not pile corpora up in the temporary folder."""
    for folder in Path(tempfile.gettempdir()).glob(f"{_PREFIX}*-*"):
        pid = folder.name[len(_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class _CorpusSink:
    """The corpus as it streams in (``read_dataset``'s ``corpus_sink``): each chunk's joined
    texts appended to an uncompressed Arrow file in a private temporary folder (the output
    folder is not claimed yet), its ids and text hashes kept. ``close`` memory-maps the file:
    the driver then holds no text, and the index stage links the file in as the mine and shard
    tasks' ``doc_texts.arrow``."""

    def __init__(self) -> None:
        _sweep_orphans()
        prefix = f"{_PREFIX}{os.getpid()}-"  # the owner, for the sweep after a killed run
        self.path = Path(tempfile.mkdtemp(prefix=prefix)) / TEXTS_FILE
        self._file = pa.OSFile(str(self.path), "wb")
        self._writer = pa.ipc.new_file(self._file, DOC_TEXTS)

    def __call__(self, chunk: pl.DataFrame) -> pl.DataFrame:
        texts = doc_text_series(chunk).to_arrow().cast(pa.large_string())
        self._writer.write_batch(pa.record_batch([texts], schema=DOC_TEXTS))
        return dedup.add_text_hash(chunk).select("doc_id", "hash")

    def close(self) -> pa.ChunkedArray:
        from curate.mine.negatives import load_doc_texts

        self._writer.close()
        self._file.close()
        return load_doc_texts(str(self.path))

    def discard(self) -> None:
        self._file.close()
        shutil.rmtree(self.path.parent, ignore_errors=True)


def text_list(texts: pa.ChunkedArray | pl.Series | list[str]) -> list[str]:
    """``Read.texts`` as Python strings, for the paths that need them (embedding, the
    false-negative check's scorers)."""
    if isinstance(texts, (pa.ChunkedArray, pa.Array, pl.Series)):
        return texts.to_pylist() if not isinstance(texts, pl.Series) else texts.to_list()
    return list(texts)


def doc_texts(corpus: pl.DataFrame) -> list[str]:
    """``doc_text_series`` as a list."""
    return doc_text_series(corpus).to_list()


def train_pairs(ds: Dataset, cfg: Config) -> pl.DataFrame:
    """Positive (query, doc) pairs of the train split that become rows (``data.train_positives``),
    sorted; optionally the first N queries."""
    pairs = ds.qrels[cfg.data.train_split].filter(pl.col("score") > 0).sort("query_id", "doc_id")
    if cfg.data.train_positives == "top_grade":
        pairs = pairs.filter(pl.col("score") == pl.col("score").max().over("query_id"))
    elif cfg.data.train_positives == "above_lowest" and pairs["score"].n_unique() > 1:
        pairs = pairs.filter(pl.col("score") > pairs["score"].min())
    elif cfg.data.train_positives == "min_score":
        pairs = pairs.filter(pl.col("score") >= cfg.data.train_min_score)
    if cfg.data.max_train_queries:
        keep = pairs["query_id"].unique(maintain_order=True)[: cfg.data.max_train_queries]
        pairs = pairs.filter(pl.col("query_id").is_in(keep.implode()))
    return pairs


def known_positives(ds: Dataset, split: str) -> Known:
    """query_id -> every doc the split's qrels call relevant (score > 0)."""
    return Known(ds.qrels[split].filter(pl.col("score") > 0))


def read(cfg: Config) -> Read:
    """The dataset read and validated, then what the data makes impossible checked."""
    data = resolve_data(cfg)
    if data.columns.vector:  # the schema only: worker tasks read the vectors (embed stage)
        for path in (data.corpus, data.queries):
            vectors.check_schema(path, data.columns.vector, cfg.storage.options)
    # The corpus streams through: its texts go to a file, ids and hashes stay (the raw title
    # and text of every document would be the driver's largest object).
    sink = _CorpusSink()
    try:
        ds = read_dataset(data, options=cfg.storage.options, corpus_sink=sink)
        pairs = train_pairs(ds, cfg)
        config_rules.check_data(cfg, pairs.height)
    except BaseException:
        sink.discard()
        raise
    known = known_positives(ds, cfg.data.train_split)
    record = Read(ds, ds.corpus, sink.close(), pairs, known, str(sink.path))
    weakref.finalize(record, shutil.rmtree, sink.path.parent, True)  # a mapping survives
    return record
