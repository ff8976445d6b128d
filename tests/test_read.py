"""Stage 1 (curate.read): the real Cranfield set, one test per validation error, a property test."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from curate.config import ColumnsConfig, DataConfig
from curate.errors import DataError
from curate.read.dataset import Dataset, read_dataset, read_table

CRANFIELD = Path(__file__).parents[2] / "shared/data/cranfield"

DOCS = [{"_id": "1", "title": "t", "text": "alpha"}, {"_id": "2", "text": "beta"}]
QUERIES = [{"_id": "q1", "text": "what alpha"}, {"_id": "q2", "text": "what beta"}]
QRELS = {"train": [("q1", "1", "1")], "test": [("q2", "2", "1")]}


def _line(record) -> bytes:
    if isinstance(record, bytes):
        return record
    return (record if isinstance(record, str) else json.dumps(record)).encode()


def write_beir(root: Path, docs=DOCS, queries=QUERIES, qrels=QRELS) -> Path:
    """A BEIR folder; records are dicts (one JSON line each), or str/bytes written verbatim."""
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    (root / "corpus.jsonl").write_bytes(b"".join(_line(r) + b"\n" for r in docs))
    (root / "queries.jsonl").write_bytes(b"".join(_line(r) + b"\n" for r in queries))
    for split, rows in qrels.items():
        lines = ["query-id\tcorpus-id\tscore", *("\t".join(r) for r in rows)]
        (root / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


def _error(cfg: DataConfig, *phrases: str, row: int | None = None) -> DataError:
    with pytest.raises(DataError) as info:
        read_dataset(cfg)
    message = str(info.value)
    for phrase in phrases:
        assert phrase in message, message
    assert info.value.row == row, message
    return info.value


def test_small_folder_reads(tmp_path):
    ds = read_dataset(DataConfig(path=str(write_beir(tmp_path))))
    assert isinstance(ds, Dataset)
    assert ds.corpus.columns == ["doc_id", "title", "text"]
    assert ds.corpus.rows() == [("1", "t", "alpha"), ("2", "", "beta")]  # absent title -> ""
    assert ds.queries.columns == ["query_id", "text"]
    assert ds.qrels["train"].schema == pl.Schema(
        {"query_id": pl.String, "doc_id": pl.String, "score": pl.Float64}
    )
    assert ds.stats["qrels"] == {"train": 1, "test": 1}


# --- the real Cranfield set -----------------------------------------------------------------


@pytest.fixture
def cranfield() -> Path:
    if not (CRANFIELD / "corpus.jsonl").is_file():
        pytest.skip(f"Cranfield not found at {CRANFIELD} (shared data folder absent)")
    return CRANFIELD


def test_cranfield_skip(cranfield):
    ds = read_dataset(DataConfig(path=str(cranfield), empty_text="skip"))
    # Lines 471 and 995 of corpus.jsonl (ids "471", "995") have empty title and text; one train
    # pair points at one of them.
    assert ds.stats["docs_read"] == 1400
    assert ds.stats["skipped_empty_docs"] == 2
    assert ds.corpus.height == 1398
    assert ds.queries.height == 225
    assert {"471", "995"}.isdisjoint(ds.corpus["doc_id"].to_list())
    assert ds.stats["dropped_qrels_of_skipped"] == {"train": 1, "test": 0}
    assert ds.qrels["train"].height == 1077 and ds.qrels["test"].height == 534
    assert ds.stats["qrels"] == {"train": 1077, "test": 534}
    for frame in (ds.corpus, ds.queries, *ds.qrels.values()):
        assert all(frame.schema[c] == pl.String for c in frame.columns if c.endswith("_id"))
    assert "1" in ds.corpus["doc_id"].to_list()  # numeric-looking ids stay strings


def test_cranfield_empty_text_errors(cranfield):
    _error(
        DataConfig(path=str(cranfield)),
        "corpus.jsonl",
        "'471'",
        "set data.empty_text: skip",
        "1-based line",
        row=471,
    )


# --- files and columns ----------------------------------------------------------------------


def test_missing_folder(tmp_path):
    _error(DataConfig(path=str(tmp_path / "nope")), "nope", "data folder not found", "data.path")


def test_missing_corpus_file(tmp_path):
    (write_beir(tmp_path) / "corpus.jsonl").unlink()
    _error(DataConfig(path=str(tmp_path)), "corpus.jsonl", "not found", "data.corpus")


def test_missing_qrels_split(tmp_path):
    cfg = DataConfig(path=str(write_beir(tmp_path)), eval_split="dev")
    _error(cfg, "qrels", "'dev'", "['test', 'train']", "data.eval_split")


def test_misnamed_column_suggests_closest(tmp_path):
    write_beir(tmp_path, docs=[{"id": "1", "text": "alpha"}, {"id": "2", "text": "beta"}])
    err = _error(DataConfig(path=str(tmp_path)), "corpus.jsonl", "did you mean 'id'", row=1)
    assert "data.columns.doc_id: id" in err.fix
    assert "['id', 'text']" in err.problem  # the columns found


def test_misnamed_qrels_header(tmp_path):
    write_beir(tmp_path)
    (tmp_path / "qrels" / "train.tsv").write_text("query-id\tdoc-id\tscore\nq1\t1\t1\n")
    _error(
        DataConfig(path=str(tmp_path)),
        "train.tsv",
        "did you mean 'doc-id'",
        "data.columns.qrels_doc_id",
        row=1,
    )


# --- ids --------------------------------------------------------------------------------------


def test_duplicate_doc_id_names_both_rows(tmp_path):
    docs = [*DOCS, {"_id": "3", "text": "c"}, {"_id": "2", "text": "again"}]
    write_beir(tmp_path, docs=docs)
    _error(
        DataConfig(path=str(tmp_path)),
        "corpus.jsonl",
        "duplicate doc_id '2'",
        "first at row 2",
        "unique",
        row=4,
    )


def test_non_string_id(tmp_path):
    write_beir(tmp_path, docs=[*DOCS, {"_id": 3, "text": "c"}])
    _error(DataConfig(path=str(tmp_path)), "corpus.jsonl", "not a string", "JSON strings", row=3)


def test_null_id(tmp_path):
    write_beir(tmp_path, queries=[*QUERIES, {"_id": None, "text": "q"}])
    _error(DataConfig(path=str(tmp_path)), "queries.jsonl", "query_id is null", row=3)


def test_numeric_looking_ids_stay_distinct(tmp_path):
    docs = [{"_id": "1", "text": "a"}, {"_id": "01", "text": "b"}]
    write_beir(tmp_path, docs=docs, qrels={"train": [("q1", "01", "1")], "test": []})
    ds = read_dataset(DataConfig(path=str(tmp_path)))
    assert ds.corpus["doc_id"].to_list() == ["1", "01"]
    assert ds.qrels["train"]["doc_id"].to_list() == ["01"]


# --- empty texts --------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", " \t\n "])
def test_empty_text_errors(tmp_path, text):
    write_beir(tmp_path, docs=[*DOCS, {"_id": "3", "title": " ", "text": text}])
    _error(
        DataConfig(path=str(tmp_path)),
        "corpus.jsonl",
        "'3'",
        "whitespace-only",
        "data.empty_text: skip",
        row=3,
    )


def test_title_alone_is_not_empty(tmp_path):
    write_beir(tmp_path, docs=[*DOCS, {"_id": "3", "title": "only a title", "text": ""}])
    assert read_dataset(DataConfig(path=str(tmp_path))).corpus.height == 3


def test_skip_drops_empty_texts_and_their_qrels(tmp_path):
    docs = [*DOCS, {"_id": "3", "text": " "}]
    queries = [*QUERIES, {"_id": "q3", "text": ""}]
    qrels = {"train": [("q1", "1", "1"), ("q1", "3", "1"), ("q3", "2", "1")], "test": []}
    write_beir(tmp_path, docs=docs, queries=queries, qrels=qrels)
    ds = read_dataset(DataConfig(path=str(tmp_path), empty_text="skip"))
    assert ds.corpus["doc_id"].to_list() == ["1", "2"]
    assert ds.queries["query_id"].to_list() == ["q1", "q2"]
    assert ds.qrels["train"].rows() == [("q1", "1", 1.0)]
    assert ds.stats["skipped_empty_docs"] == 1 and ds.stats["skipped_empty_queries"] == 1
    assert ds.stats["dropped_qrels_of_skipped"] == {"train": 2, "test": 0}


# --- qrels -------------------------------------------------------------------------------------


def test_qrels_unknown_query_id(tmp_path):
    write_beir(tmp_path, qrels={"train": [("q1", "1", "1"), ("q9", "2", "1")], "test": []})
    _error(
        DataConfig(path=str(tmp_path)),
        "train.tsv",
        "query_id 'q9' is not in the queries",
        "remove the row",
        row=3,
    )


def test_qrels_unknown_doc_id(tmp_path):
    write_beir(tmp_path, qrels={"train": [], "test": [("q2", "2", "1"), ("q2", "7", "1")]})
    _error(
        DataConfig(path=str(tmp_path)),
        "test.tsv",
        "doc_id '7' is not in the corpus",
        "add it to the corpus",
        row=3,
    )


def test_qrels_non_numeric_score(tmp_path):
    write_beir(tmp_path, qrels={"train": [("q1", "1", "1"), ("q1", "2", "high")], "test": []})
    _error(DataConfig(path=str(tmp_path)), "train.tsv", "'high'", "write scores as numbers", row=3)


def test_qrels_wrong_field_count(tmp_path):
    write_beir(tmp_path, qrels={"train": [("q1", "1")], "test": []})
    _error(DataConfig(path=str(tmp_path)), "train.tsv", "2 fields", row=2)


# --- broken lines ------------------------------------------------------------------------------


def test_malformed_json_line(tmp_path):
    write_beir(tmp_path, docs=[DOCS[0], '{"_id": "2", "text": "be', DOCS[1]])
    _error(
        DataConfig(path=str(tmp_path)),
        "corpus.jsonl",
        "malformed JSON",
        "one complete JSON object",
        row=2,
    )


def test_invalid_utf8(tmp_path):
    write_beir(tmp_path, queries=[*QUERIES, b'{"_id": "q3", "text": "caf\xe9"}'])
    _error(DataConfig(path=str(tmp_path)), "queries.jsonl", "invalid UTF-8", "re-encode", row=3)


# --- Parquet and overrides ------------------------------------------------------------------


def _parquet_cfg(tmp_path: Path, doc_ids: list[str]) -> DataConfig:
    n = len(doc_ids)
    pl.DataFrame({"pid": doc_ids, "body": [f"doc {i}" for i in range(n)]}).write_parquet(
        tmp_path / "docs.parquet"
    )
    pl.DataFrame({"qid": ["q1"], "question": ["what"]}).write_parquet(tmp_path / "qs.parquet")
    (tmp_path / "rels").mkdir()
    pl.DataFrame({"q": ["q1"], "d": [doc_ids[0]], "rel": [2]}).write_parquet(
        tmp_path / "rels" / "train.parquet"
    )
    cols = ColumnsConfig(
        doc_id="pid",
        text="body",
        query_id="qid",
        query_text="question",
        qrels_query_id="q",
        qrels_doc_id="d",
        qrels_score="rel",
    )
    return DataConfig(
        path=str(tmp_path / "unused"),
        corpus=str(tmp_path / "docs.parquet"),
        queries=str(tmp_path / "qs.parquet"),
        qrels_dir=str(tmp_path / "rels"),
        eval_split=None,
        columns=cols,
    )


def test_parquet_with_custom_columns(tmp_path):
    ds = read_dataset(_parquet_cfg(tmp_path, ["d1", "d2", "d3"]))
    assert ds.corpus.rows() == [("d1", "", "doc 0"), ("d2", "", "doc 1"), ("d3", "", "doc 2")]
    assert ds.queries.rows() == [("q1", "what")]
    assert ds.qrels == {"train": ds.qrels["train"]} and ds.qrels["train"].rows() == [
        ("q1", "d1", 2.0)
    ]


def test_parquet_duplicate_id_names_zero_based_row(tmp_path):
    cfg = _parquet_cfg(tmp_path, ["d1", "d2", "d3", "d2"])
    _error(cfg, "docs.parquet", "duplicate doc_id 'd2'", "first at row 1", "0-based", row=3)


def test_parquet_integer_ids_rejected(tmp_path):
    cfg = _parquet_cfg(tmp_path, ["1"])
    pl.DataFrame({"pid": [1], "body": ["x"]}).write_parquet(tmp_path / "docs.parquet")
    _error(cfg, "docs.parquet", "must be strings", "store the column as strings")


def test_jsonl_qrels_and_read_table(tmp_path):
    write_beir(tmp_path)
    (tmp_path / "qrels" / "train.tsv").unlink()
    rows = [{"query-id": "q1", "corpus-id": "2", "score": 1}]
    (tmp_path / "qrels" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = read_dataset(DataConfig(path=str(tmp_path)), splits=["train"])
    assert list(ds.qrels) == ["train"] and ds.qrels["train"].rows() == [("q1", "2", 1.0)]
    table = read_table(tmp_path / "qrels" / "test.tsv", "qrels")
    assert table.rows() == [("q2", "2", 1.0)]


# --- property: a Dataset is clean, or the error names a line that is really bad --------------

_BROKEN = [
    '{"_id": "x", "text": ',  # truncated JSON
    b'{"_id": "x", "text": "\xff"}',  # invalid UTF-8
    '{"_id": 5, "text": "number id"}',
    '{"_id": null, "text": "null id"}',
    '{"text": "no id"}',
    "[1, 2]",
]
_docs = st.lists(
    st.one_of(
        st.fixed_dictionaries(
            {
                "_id": st.text(alphabet="abc", min_size=1, max_size=2),
                "text": st.one_of(
                    st.sampled_from(["", " ", "\t\n"]), st.text("ab \t\n", max_size=4)
                ),
            },
            optional={"title": st.sampled_from(["", " ", "T"])},
        ),
        st.sampled_from(_BROKEN),
    ),
    max_size=12,
)


def _offending(lines: list, row: int, mode: str) -> bool:
    """Is line ``row`` (1-based) broken, a repeated id, or (in error mode) an empty text?"""
    record = lines[row - 1]
    if not isinstance(record, dict):
        return True
    earlier = [r["_id"] for r in lines[: row - 1] if isinstance(r, dict)]
    empty = not (record.get("title", "") + record["text"]).strip()
    return record["_id"] in earlier or (mode == "error" and empty)


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(lines=_docs, mode=st.sampled_from(["error", "skip"]))
def test_property_clean_or_names_offending_line(tmp_path_factory, lines, mode):
    root = write_beir(tmp_path_factory.mktemp("beir"), docs=lines, qrels={"train": []})
    cfg = DataConfig(path=str(root), eval_split=None, empty_text=mode)
    try:
        ds = read_dataset(cfg)
    except DataError as e:
        assert e.file.endswith("corpus.jsonl")
        if e.row is None:  # no usable document at all: named as such, with no row
            assert all(isinstance(r, dict) for r in lines), (e, lines)
            assert not any((r.get("title", "") + r["text"]).strip() for r in lines), (e, lines)
            return
        assert _offending(lines, e.row, mode), (e, lines)
        return
    assert not any(_offending(lines, r, mode) for r in range(1, len(lines) + 1))
    ids = ds.corpus["doc_id"].to_list()
    assert len(ids) == len(set(ids))
    assert all((t + x).strip() for t, x in ds.corpus.select("title", "text").rows())
    expected = [r["_id"] for r in lines if (r.get("title", "") + r["text"]).strip()]
    assert ids == expected


def test_dataset_is_frozen(tmp_path):
    ds = read_dataset(DataConfig(path=str(write_beir(tmp_path))))
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.stats = {}  # type: ignore[misc]


@pytest.mark.parametrize("kind", ["corpus", "queries"])
@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_corpus_or_queries_file_is_named(tmp_path, kind, content):
    root = write_beir(tmp_path)
    (root / f"{kind}.jsonl").write_text(content)
    err = _error(DataConfig(path=str(root)), f"{kind}.jsonl", "no rows", "Fix:")
    assert err.file == str(root / f"{kind}.jsonl")
    assert "qrels" not in err.file


def test_corpus_of_only_empty_texts_is_named_when_skipped(tmp_path):
    root = write_beir(tmp_path, docs=[{"_id": "1", "text": " "}, {"_id": "2", "text": ""}])
    err = _error(DataConfig(path=str(root), empty_text="skip"), "all 2 rows", "empty text")
    assert err.file == str(root / "corpus.jsonl")


# --- which judged positives become training rows ----------------------------------------------

GRADED = {"train": [("q1", "1", "2"), ("q1", "2", "1"), ("q2", "2", "1")],
          "test": [("q2", "2", "1")]}


@pytest.mark.parametrize(
    ("policy", "rows"),
    [("all", [("q1", "1"), ("q1", "2"), ("q2", "2")]),
     ("top_grade", [("q1", "1"), ("q2", "2")]),  # q2's best is grade 1: it keeps its row
     ("above_lowest", [("q1", "1")]),  # grades 1 and 2 in the split: the 1s train no row
     ("min_score", [("q1", "1")])],  # q2 has nothing at 2: no row
)
def test_train_positives_policy_keeps_every_known_positive(tmp_path, policy, rows):
    from curate.config import config_from_dict
    from curate.read.stage import read

    root = write_beir(tmp_path / "d", qrels=GRADED)
    cfg = config_from_dict({"output_dir": str(tmp_path / "out"), "data": {
        "path": str(root), "train_positives": policy, "train_min_score": 2}})
    r = read(cfg)
    assert r.pairs.select("query_id", "doc_id").rows() == rows
    assert {q: sorted(d) for q, d in r.known.items()} == {"q1": ["1", "2"], "q2": ["2"]}


def test_min_score_with_nothing_left_names_the_key(tmp_path):
    from curate.config import config_from_dict
    from curate.errors import ConfigError
    from curate.read.stage import read

    cfg = config_from_dict({"output_dir": str(tmp_path / "out"), "data": {
        "path": str(write_beir(tmp_path / "d")), "train_positives": "min_score",
        "train_min_score": 3}})
    with pytest.raises(ConfigError, match="data.train_min_score"):
        read(cfg)


def test_read_record_holds_ids_and_hashes_and_maps_the_texts(tmp_path, monkeypatch):
    """The driver keeps doc_id and a u64 hash of the corpus frame; the joined texts live in an
    Arrow file it memory-maps (outside the unclaimed output folder), written a chunk of rows at
    a time (one row here), removed with the record."""
    import gc

    import pyarrow as pa

    from curate.config import config_from_dict
    from curate.read import dataset
    from curate.read.stage import read

    monkeypatch.setattr(dataset, "_CHUNK", 1)
    out = tmp_path / "out"
    data = {"path": str(write_beir(tmp_path))}
    r = read(config_from_dict({"output_dir": str(out), "data": data}))
    assert r.corpus.columns == ["doc_id", "hash"] and r.corpus.schema["hash"] == pl.UInt64
    assert r.dataset.corpus is r.corpus
    assert isinstance(r.texts, pa.ChunkedArray) and r.texts.to_pylist() == ["t alpha", "beta"]
    assert r.texts.num_chunks == 2
    folder = Path(r.texts_file).parent
    assert folder.is_dir() and not out.exists()  # nothing written in the output folder yet
    del r
    gc.collect()
    assert not folder.exists()


def test_streamed_corpus_names_a_duplicate_across_chunks_and_leaves_no_texts(tmp_path,
                                                                             monkeypatch):
    """A corpus read a chunk at a time (one row here) still names both rows of a repeated id,
    and the text file begun for it is removed with the error."""
    import glob
    import tempfile

    from curate.config import config_from_dict
    from curate.read import dataset
    from curate.read.stage import read

    monkeypatch.setattr(dataset, "_CHUNK", 1)
    pattern = str(Path(tempfile.gettempdir()) / "curate-texts-*")
    before = set(glob.glob(pattern))
    root = write_beir(tmp_path / "d", docs=[*DOCS, {"_id": "3", "text": "c"},
                                            {"_id": "2", "text": "again"}])  # fmt: skip
    cfg = config_from_dict({"output_dir": str(tmp_path / "out"), "data": {"path": str(root)}})
    with pytest.raises(DataError, match=r"duplicate doc_id '2' \(first at row 2\)") as e:
        read(cfg)
    assert e.value.row == 4 and set(glob.glob(pattern)) == before


def test_an_id_repeated_by_a_skipped_empty_row_is_named(tmp_path):
    """The corpus read keeps no column of every id with its row: the uniqueness check runs on
    the kept and skipped ids, and the file is read again for the row only when one repeats,
    here between a kept row and a row skipped for its empty text."""
    from curate.config import config_from_dict
    from curate.read.stage import read

    root = write_beir(tmp_path / "d", docs=[*DOCS, {"_id": "1", "text": "  "}])
    cfg = config_from_dict({"output_dir": str(tmp_path / "out"),
                            "data": {"path": str(root), "empty_text": "skip"}})
    with pytest.raises(DataError, match=r"duplicate doc_id '1' \(first at row 1\)") as e:
        read(cfg)
    assert e.value.row == 3  # JSONL rows are 1-based line numbers


def test_a_killed_runs_text_folder_is_swept_by_the_next_read(tmp_path):
    """A driver killed mid-run cannot remove its memory-mapped texts; the next read removes
    the folders of processes that no longer run, and leaves a live process's alone."""
    import os
    import subprocess
    import sys
    import tempfile

    from curate.config import config_from_dict
    from curate.read.stage import read

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    orphan = Path(tempfile.mkdtemp(prefix=f"curate-texts-{dead}-"))
    alive = Path(tempfile.mkdtemp(prefix=f"curate-texts-{os.getppid()}-"))
    cfg = config_from_dict({"output_dir": str(tmp_path / "out"),
                            "data": {"path": str(write_beir(tmp_path / "d"))}})
    r = read(cfg)
    assert not orphan.exists() and alive.is_dir() and Path(r.texts_file).is_file()
    alive.rmdir()


def test_known_positives_are_one_frame_read_as_a_mapping():
    """Read.known holds (query_id, doc_id) pairs, not a dict of lists (~210 MB of Python at 1M
    queries): each query's docs in the qrels' order, many queries' at once as columns, an
    absent query a KeyError (and 0 in ``flat``), relabelled pairs after a query's own."""
    from curate.records import Known

    known = Known(pl.DataFrame({"query_id": ["b", "a", "b", "c"], "doc_id": ["3", "1", "2", "9"]}))
    assert dict(known) == {"a": ["1"], "b": ["3", "2"], "c": ["9"]} and len(known) == 3
    with pytest.raises(KeyError):
        known["zz"]
    counts, docs = known.flat(["b", "zz", "c", "b"])
    assert counts.tolist() == [2, 0, 1, 2] and docs.to_list() == ["3", "2", "9", "3", "2"]
    assert known.flat([])[0].tolist() == [] and Known.of({}).flat(["a"])[0].tolist() == [0]
    more = known.plus(pl.DataFrame({"query_id": ["a", "d"], "doc_id": ["7", "8"]}))
    assert more["a"] == ["1", "7"] and more["d"] == ["8"] and "d" not in known
    assert Known.of(dict(known)).pairs.equals(known.pairs) and Known.of(known) is known


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.sampled_from("abcdefgh"), max_size=12),
       ids=st.lists(st.sampled_from("abcdefghij"), max_size=20))
def test_membership_and_repeat_checks_agree_with_polars(values, ids):
    """The read stage's memory-light checks (a set built over the smaller side, sorted hashes
    for repeats) answer what ``is_in`` and ``n_unique`` answer, on either side being larger."""
    from curate.read.dataset import _is_in, _may_repeat

    v, i = pl.Series(values, dtype=pl.String), pl.Series(ids, dtype=pl.String)
    assert _is_in(v, i).to_list() == v.is_in(i.implode()).to_list()
    assert _may_repeat(i) == (i.n_unique() < i.len())
