"""Bad input and mismatched artifacts: each fails with a named error and leaves nothing behind.

tests/test_read.py checks the reader's messages one case at a time; here the whole pipeline runs
on bad data and must leave its output folder absent, Parquet tables and qrels are generated with
hypothesis, and NaN embeddings or an index from another model stop the run with a
StageMismatchError naming both sides.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from slice_data import pipeline_config, write_slice

from curate.config import DataConfig, EmbedConfig, config_from_dict
from curate.embed import encoder as embed
from curate.errors import (
    ConfigError,
    DataError,
    NonFiniteEmbeddingError,
    StageMismatchError,
)
from curate.index import build as index
from curate.mine.negatives import load_doc_ids, write_doc_ids
from curate.read.dataset import read_dataset, read_table
from pipelines.run import run

DOCS = [{"_id": "d1", "title": "wings", "text": "lift on a wing"}, {"_id": "d2", "text": "drag"}]
QUERIES = [{"_id": "q1", "text": "what is lift"}, {"_id": "q2", "text": "what is drag"}]
QRELS = "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\n"


def _beir(root: Path, docs=DOCS, queries=QUERIES, qrels=QRELS) -> Path:
    """A BEIR folder; records are dicts (JSON lines) or bytes written verbatim."""
    (root / "qrels").mkdir(parents=True)
    for name, rows in (("corpus", docs), ("queries", queries)):
        lines = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows]
        (root / f"{name}.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (root / "qrels" / "train.tsv").write_text(qrels)
    return root


# --- bad input: a named error, and nothing written --------------------------------------------

_BAD = {
    "missing corpus": (lambda r: (r / "corpus.jsonl").unlink(), "corpus.jsonl", "not found", None),
    "misnamed id column": (
        lambda r: _beir(r, docs=[{"id": "d1", "text": "x"}]), "corpus.jsonl",
        "did you mean 'id'", 1),
    "duplicate ids": (
        lambda r: _beir(r, docs=[*DOCS, {"_id": "d1", "text": "again"}]), "corpus.jsonl",
        "duplicate doc_id 'd1'", 3),
    "qrels unknown doc": (
        lambda r: _beir(r, qrels=QRELS + "q1\td9\t1\n"), "train.tsv",
        "'d9' is not in the corpus", 4),
    "qrels unknown query": (
        lambda r: _beir(r, qrels=QRELS + "q7\td1\t1\n"), "train.tsv",
        "'q7' is not in the queries", 4),
    "whitespace text": (
        lambda r: _beir(r, queries=[*QUERIES, {"_id": "q3", "text": " \t"}]), "queries.jsonl",
        "whitespace-only", 3),
    "invalid utf-8": (
        lambda r: _beir(r, docs=[*DOCS, b'{"_id": "d3", "text": "caf\xe9"}']), "corpus.jsonl",
        "invalid UTF-8", 3),
    "malformed json": (
        lambda r: _beir(r, docs=[DOCS[0], b'{"_id": "d3", '
                                          b'"te']), "corpus.jsonl", "malformed JSON", 2),
}  # fmt: skip


@pytest.mark.parametrize("case", list(_BAD))
def test_bad_input_is_named_and_nothing_is_written(tmp_path, tiny_model, case):
    make, file, phrase, row = _BAD[case]
    data = tmp_path / "data"
    if case == "missing corpus":
        _beir(data)
    make(data)
    out = tmp_path / "out"
    cfg = config_from_dict(pipeline_config(out, data, tiny_model, data={"empty_text": "error"}))
    with pytest.raises(DataError) as info:
        run(cfg)
    err = info.value
    assert err.file.endswith(file) and phrase in str(err) and "Fix:" in str(err), str(err)
    assert err.row == row, str(err)
    assert not out.exists(), sorted(out.rglob("*"))


def test_bad_model_folder_is_named_and_nothing_is_written(tmp_path):
    out = tmp_path / "out"
    cfg = config_from_dict(pipeline_config(out, _beir(tmp_path / "data"), tmp_path / "no-model"))
    with pytest.raises(ConfigError, match="embed.model"):
        run(cfg)
    assert not out.exists()


# --- property: Parquet tables and qrels are clean, or the error names an offending row --------

_ID = st.one_of(st.none(), st.sampled_from(["a", "b", "c", "", " "]))
_TEXT = st.one_of(st.none(), st.sampled_from(["", " ", "text"]))


def _blank(v) -> bool:
    return v is None or not v.strip()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ids=st.lists(_ID, max_size=8),
    texts=st.data(),
    id_kind=st.sampled_from(["string", "string", "string", "int", "missing"]),
)
def test_property_parquet_corpus(tmp_path_factory, ids, texts, id_kind):
    texts = texts.draw(st.lists(_TEXT, min_size=len(ids), max_size=len(ids)))
    path = tmp_path_factory.mktemp("pq") / "corpus.parquet"
    col = {"string": "_id", "int": "_id", "missing": "doc"}[id_kind]
    values = [i for i, _ in enumerate(ids)] if id_kind == "int" else ids
    dtype = pl.Int64 if id_kind == "int" else pl.String
    pl.DataFrame(
        {col: values, "text": texts}, schema={col: dtype, "text": pl.String}
    ).write_parquet(path)
    try:
        frame = read_table(path, "corpus")
    except DataError as e:
        assert e.file == str(path) and "Fix:" in str(e)
        if id_kind != "string":  # a column problem: no row to name
            assert e.row is None and (
                "no column '_id'" in e.problem or "must be strings" in e.problem
            )
            return
        blank = [r for r, v in enumerate(ids) if _blank(v)]
        dups = [r for r, v in enumerate(ids) if v in ids[:r]]
        assert e.row == (blank or dups)[0], (e, ids)  # nulls/blanks first, then repeats, 0-based
        return
    assert id_kind == "string" and not any(_blank(v) for v in ids) and len(set(ids)) == len(ids)
    assert frame["doc_id"].to_list() == ids
    assert frame["text"].to_list() == [t or "" for t in texts]


_SCORES = {  # Parquet column type -> values and whether each is a finite number
    "int": {1: True, 0: True, None: False},
    "float": {1.0: True, 2.5: True, math.nan: False, math.inf: False, None: False},
    "string": {"1": True, "2.5": True, "high": False, "": False, "nan": False, None: False},
}


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(kind=st.sampled_from(sorted(_SCORES)), data=st.data())
def test_property_parquet_qrels_against_the_corpus(tmp_path_factory, kind, data):
    rows = data.draw(st.lists(st.tuples(
        st.one_of(st.none(), st.sampled_from(["q1", "q2", "q9", " "])),
        st.one_of(st.none(), st.sampled_from(["d1", "d2", "d9", ""])),
        st.sampled_from(list(_SCORES[kind])),
    ), max_size=6))  # fmt: skip
    root = tmp_path_factory.mktemp("pq")
    (root / "rels").mkdir()
    pl.DataFrame([{"_id": d["_id"], "text": d["text"]} for d in DOCS]).write_parquet(
        root / "c.parquet"
    )
    pl.DataFrame(QUERIES).write_parquet(root / "q.parquet")
    dtype = {"int": pl.Int64, "float": pl.Float64, "string": pl.String}[kind]
    schema = {"query-id": pl.String, "corpus-id": pl.String, "score": dtype}
    pl.DataFrame(rows, schema=schema, orient="row").write_parquet(root / "rels" / "train.parquet")
    cfg = DataConfig(path=str(root), corpus=str(root / "c.parquet"),
                     queries=str(root / "q.parquet"), qrels_dir=str(root / "rels"),
                     eval_split=None)  # fmt: skip

    def offends(q, d, s) -> bool:
        unknown = q not in {"q1", "q2"} or d not in {"d1", "d2"}
        return unknown or not _SCORES[kind][s]

    try:
        ds = read_dataset(cfg)
    except DataError as e:
        assert e.file.endswith("train.parquet") and "Fix:" in str(e) and e.row is not None
        assert offends(*rows[e.row]), (e, rows)
        return
    assert not any(offends(*r) for r in rows), rows
    got = ds.qrels["train"]
    assert got.rows() == [(q, d, float(s)) for q, d, s in rows]


def test_parquet_inputs_are_checked_by_id_not_by_row_number(tmp_path):
    # Regression: Parquet frames carried their row number as the first column, which the reader
    # took for the id: unknown qrels ids passed and empty texts were named by row number.
    pl.DataFrame({"_id": ["d1", "d2", "d3"], "text": ["a", "b", " "]}).write_parquet(
        tmp_path / "c.parquet"
    )
    pl.DataFrame(QUERIES).write_parquet(tmp_path / "q.parquet")
    (tmp_path / "rels").mkdir()
    rels = pl.DataFrame({"query-id": ["q1", "q1"], "corpus-id": ["d3", "d1"], "score": [1, 1]})
    rels.write_parquet(tmp_path / "rels" / "train.parquet")
    cfg = DataConfig(path=str(tmp_path), corpus=str(tmp_path / "c.parquet"),
                     queries=str(tmp_path / "q.parquet"), qrels_dir=str(tmp_path / "rels"),
                     eval_split=None)  # fmt: skip
    with pytest.raises(DataError, match="doc_id 'd3' has empty") as info:
        read_dataset(cfg)
    assert info.value.row == 2
    ds = read_dataset(replace(cfg, empty_text="skip"))
    assert ds.stats["skipped_empty_docs"] == 1 and ds.qrels["train"].rows() == [("q1", "d1", 1.0)]
    rels.with_columns(pl.lit("d9").alias("corpus-id")).write_parquet(
        tmp_path / "rels" / "train.parquet"
    )
    with pytest.raises(DataError, match="doc_id 'd9' is not in the corpus") as info:
        read_dataset(replace(cfg, empty_text="skip"))
    assert info.value.row == 0


# --- NaN embeddings -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory, tiny_model) -> Path:
    """The tiny BERT with the embedding of the token "wing" set to NaN: any text holding the word
    embeds to NaN (attention spreads it over the sequence); others embed normally."""
    import torch
    from transformers import AutoTokenizer, BertModel

    path = tmp_path_factory.mktemp("nan-bert")
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    model = BertModel.from_pretrained(str(tiny_model))
    (wing,) = tok("wing", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        model.embeddings.word_embeddings.weight[wing] = float("nan")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_nan_embeddings_raise_naming_model_partition_and_ids(tmp_path, nan_model):
    out = tmp_path / "part.parquet"
    ids, texts = ["a", "b", "c"], ["drag on a body", "lift on a wing", "wing flutter"]
    cfg = EmbedConfig(model=str(nan_model), dtype="float32", device="cpu")
    with pytest.raises(NonFiniteEmbeddingError) as info:
        embed.embed_partition(ids, texts, str(out), str(nan_model), cfg, "")
    message = str(info.value)
    assert isinstance(info.value, StageMismatchError)
    assert str(nan_model) in message and "part.parquet" in message and "Fix:" in message
    assert "['b', 'c']" in message and "'a'" not in message  # only the ids that are NaN
    assert not list(tmp_path.iterdir())  # nothing written, not even a temp file


# --- stages that do not belong together ----------------------------------------------------


def test_embedding_partitions_of_two_dimensions_are_refused(tmp_path):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    embed.write_embeddings(a, ["x"], np.ones((1, 4), np.float32), "float32")
    embed.write_embeddings(b, ["y"], np.ones((1, 8), np.float32), "float32")
    with pytest.raises(StageMismatchError, match=r"a\.parquet.*4.*b\.parquet.*8.*Fix: delete"):
        embed.read_embeddings([a, b])


def test_index_record_names_both_models(tmp_path):
    index.write_record(tmp_path, "model-a", "fp-a", 384, 10)
    index.check_record(tmp_path, "model-a", "fp-a", 384, 10)  # the same: passes
    with pytest.raises(StageMismatchError) as info:
        index.check_record(tmp_path, "model-b", "fp-b", 32, 10)
    message = str(info.value)
    for part in ("'model-a'", "fp-a", "dim 384", "'model-b'", "fp-b", "dim 32", "Fix: delete"):
        assert part in message, message
    (tmp_path / index.RECORD).unlink()
    with pytest.raises(StageMismatchError, match="missing"):
        index.check_record(tmp_path, "model-a", "fp-a", 384, 10)


def test_error_types_survive_a_process_boundary():
    import pickle

    for err in (DataError("f.jsonl", "bad", "fix it", row=3), NonFiniteEmbeddingError("nan"),
                StageMismatchError("a vs b")):  # fmt: skip
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err)


@pytest.fixture(scope="module")
def scheduler():
    """One single-worker cluster for this module's pipeline runs (cluster.scheduler)."""
    from distributed import LocalCluster

    logging.getLogger("distributed").setLevel(logging.ERROR)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=logging.ERROR) as cluster:  # fmt: skip
        yield cluster.scheduler_address


@pytest.fixture(scope="module")
def small(tmp_path_factory, cranfield) -> Path:
    return write_slice(tmp_path_factory.mktemp("small"), cranfield, n_queries=6, n_docs=40)


def _small_cfg(out, data, model, scheduler):
    return config_from_dict(pipeline_config(out, data, model, cluster={"scheduler": scheduler}))


def test_nan_model_stops_the_pipeline_with_a_named_error(tmp_path, small, nan_model, scheduler):
    # Cranfield is about aerodynamics: "wing" is in some docs of every partition.
    with pytest.raises(NonFiniteEmbeddingError, match="NaN/inf embeddings"):
        run(_small_cfg(tmp_path / "out", small, nan_model, scheduler))
    for part in (tmp_path / "out" / "cache").rglob("*.parquet"):  # partitions without the word
        assert np.isfinite(embed.read_embeddings([part])[1]).all()
    assert not (tmp_path / "out" / "work" / "index.faiss").exists()


def test_index_of_another_model_is_refused_before_mining(tmp_path, small, tiny_model, scheduler):
    out = tmp_path / "out"
    cfg = _small_cfg(out, small, tiny_model, scheduler)
    run(cfg, stop_after="index")
    work = out / "work"
    record = json.loads((work / index.RECORD).read_text())
    n = record["docs"]
    # Another model's index (dim 16) put in place behind the fingerprint stamp's back.
    other = faiss.IndexFlatIP(16)
    other.add(np.eye(16, dtype=np.float32)[np.arange(n) % 16])
    faiss.write_index(other, str(work / "index.faiss"))
    index.write_record(work, "other-model", "fp-other", 16, n)
    with pytest.raises(StageMismatchError) as info:
        run(cfg, stop_after="mine")
    message = str(info.value)
    for part in ("'other-model'", "fp-other", "dim 16", repr(str(tiny_model)), "dim 32", "Fix:"):
        assert part in message, message
    assert not (work / "mined").exists() or not list((work / "mined").iterdir())

    # The record put back but the index file still the other model's: the search task refuses it.
    index.write_record(work, record["model"], record["model_fingerprint"], record["dim"], n)
    with pytest.raises(StageMismatchError, match=r"index\.faiss holds 16-dim vectors.*32-dim"):
        run(cfg, stop_after="mine")


def test_a_work_folder_without_the_mapped_ids_is_built_again(tmp_path, small, tiny_model,
                                                              scheduler):
    """A work folder from before the ids were a mapped file (or one a crash left short) is not
    taken as built: the index stage writes its inputs again and mining reads the ids."""
    out = tmp_path / "out"
    cfg = _small_cfg(out, small, tiny_model, scheduler)
    run(cfg, stop_after="index")
    work = out / "work"
    written = (work / "doc_ids.arrow").read_bytes()
    (work / "doc_ids.arrow").unlink()
    run(cfg, stop_after="mine")
    assert (work / "doc_ids.arrow").read_bytes() == written
    ids = load_doc_ids(str(work / "doc_ids.arrow")).to_pylist()
    assert len(ids) == json.loads((work / index.RECORD).read_text())["docs"]
    parts = [p for p in (work / "mined").glob("*.parquet") if "forbidden" not in p.name]
    mined = pl.concat([pl.read_parquet(p) for p in parts])
    assert mined.height and set(mined["neg_ids"].explode().drop_nulls()) <= set(ids)


def test_mapped_ids_come_back_as_strings_whatever_their_chunks(tmp_path):
    from curate.mine.negatives import take_strings
    from pipelines.searching import _ids_lists

    ids = pl.concat([pl.Series("doc_id", [f"d{i}" for i in range(5)]),
                     pl.Series("doc_id", [f"e{i}" for i in range(4)])], rechunk=False)
    write_doc_ids(tmp_path / "doc_ids.arrow", ids)
    mapped = load_doc_ids(str(tmp_path / "doc_ids.arrow"))
    assert mapped.to_pylist() == ids.to_list()
    taken = take_strings(mapped, [8, 0, 5])
    assert taken.type == pa.string() and taken.to_pylist() == ["e3", "d0", "e0"]
    lists = _ids_lists(mapped, [[1, 6], [], [4]])
    assert lists.type == pa.list_(pa.string())
    assert lists.to_pylist() == [["d1", "e1"], [], ["d4"]]


@pytest.mark.parametrize("kind", ["polars", "arrow", "list", "empty"])
def test_doc_columns_are_written_a_slice_at_a_time_and_read_back_whole(tmp_path, monkeypatch,
                                                                       kind):
    """The index stage writes 10M ids a slice at a time (no second copy of the column in the
    driver): the mapped file holds every value in order, whatever the input's form."""
    from curate.mine import negatives

    monkeypatch.setattr(negatives, "_WRITE_ROWS", 3)
    values = [] if kind == "empty" else [f"d{i}" for i in range(8)]
    given = {"polars": pl.Series("doc_id", values, pl.String), "list": values,
             "arrow": pa.chunked_array([values[:5], values[5:]], pa.string()),
             "empty": pl.Series("doc_id", values, pl.String)}[kind]  # fmt: skip
    write_doc_ids(tmp_path / "doc_ids.arrow", given)
    mapped = load_doc_ids(str(tmp_path / "doc_ids.arrow"))
    assert mapped.type == pa.large_string() and mapped.to_pylist() == values
    assert all(len(chunk) <= 3 for chunk in mapped.chunks)  # written in slices
