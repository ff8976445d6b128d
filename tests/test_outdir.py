"""The output folder rule (curate.outdir) and the shard writer's deletions: curate refuses a
non-empty folder that is not one of its runs, and never deletes a file it did not write."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from slice_data import pipeline_config, write_slice

from curate import faults, outdir, schema
from curate.batch import shards
from curate.config import config_from_dict
from curate.errors import OutputDirError
from pipelines import cli
from pipelines.run import run


def _foreign(root: Path) -> Path:
    """A folder of another program's files, with names curate also writes."""
    (root / "shards").mkdir(parents=True)
    (root / "report.html").write_text("<p>someone else's report</p>")
    (root / "report.json").write_text(json.dumps({"accuracy": 0.9}))
    pq.write_table(pa.table({"x": [1, 2]}), root / "shards" / "shard-00099.parquet")
    return root


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _rows(n_batches: int, rows_per_batch: int = 2) -> pa.Table:
    rows = [{"batch_id": b, "query_id": f"q{b}-{i}", "query": "q", "pos_id": "p", "pos": "p",
             "pos_score": 0.5, "neg_ids": ["n"], "negs": ["n"], "neg_scores": [0.1],
             "neg_ranks": [1], "topic": 0, "known_pos_ids": ["p"]}
            for b in range(n_batches) for i in range(rows_per_batch)]  # fmt: skip
    return pa.Table.from_pylist(rows, schema=schema.SHARD)


# --- the rule -----------------------------------------------------------------------------------


def test_new_and_empty_folders_are_accepted(tmp_path):
    outdir.check(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    outdir.check(tmp_path / "empty")
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_a_foreign_folder_is_refused_saying_why_and_how(tmp_path):
    root = _foreign(tmp_path / "theirs")
    with pytest.raises(OutputDirError) as info:
        outdir.check(root)
    err = str(info.value)
    assert str(root) in err and "not empty" in err and "not a curate run" in err
    assert "report.html" in err  # what is there
    assert "--overwrite" in err and "empty or new folder" in err  # and how to go on
    outdir.check(root, overwrite=True)  # the explicit flag lets it through


def test_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputDirError, match="is a file, not a folder"):
        outdir.check(tmp_path / "f", overwrite=True)


@pytest.mark.parametrize(
    "make",
    [
        lambda r: outdir.claim(r),
        lambda r: (r / shards.MANIFEST).write_text(json.dumps({"format": "curate-shards/1"})),
        lambda r: ((r / "shards").mkdir(), (r / "shards" / shards.MANIFEST).write_text(
            json.dumps({"format": "curate-shards/1"}))),  # an older run: inside shards/
        lambda r: (r / "report.json").write_text(json.dumps({"output_dir": str(r), "timings": {}})),
        lambda r: outdir.claim(r / "round-1"),  # a retrain loop's folder
    ],
    ids=["marker", "manifest", "old manifest", "report.json", "loop"],
)
def test_curate_runs_are_recognised(tmp_path, make):
    root = tmp_path / "run"
    root.mkdir()
    (root / "extra.txt").write_text("x")
    make(root)
    assert outdir.curate_sign(root)
    outdir.check(root)


def test_a_lookalike_report_json_is_not_a_curate_sign(tmp_path):
    assert outdir.curate_sign(_foreign(tmp_path / "theirs")) is None


def test_the_demo_data_curate_wrote_is_its_own(tmp_path):
    from curate.read.synth import write_demo_dataset

    write_demo_dataset(tmp_path / "run" / "demo-data", seed=0)
    assert outdir.curate_sign(tmp_path / "run") == "demo-data/"


def test_claim_writes_the_marker_with_the_format(tmp_path):
    outdir.claim(tmp_path / "run")
    marker = json.loads((tmp_path / "run" / outdir.MARKER).read_text())
    assert marker["format"] == outdir.FORMAT


# --- run, validate and the CLI refuse before writing anything ------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory, cranfield) -> Path:
    return write_slice(tmp_path_factory.mktemp("slice"), cranfield, n_queries=6, n_docs=40)


def test_run_into_a_foreign_folder_changes_nothing(tmp_path, data, tiny_model):
    root = _foreign(tmp_path / "theirs")
    before = _snapshot(root)
    with pytest.raises(OutputDirError, match="--overwrite"):
        run(config_from_dict(pipeline_config(root, data, tiny_model)))
    assert _snapshot(root) == before


@pytest.mark.parametrize("command", ["run", "mine", "loop", "validate"])
def test_cli_refuses_a_foreign_output_with_exit_2(tmp_path, command, capsys):
    root = _foreign(tmp_path / "theirs")
    before = _snapshot(root)
    assert cli.main([command, "configs/demo.yaml", "--output", str(root), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: output_dir:") and "--overwrite" in err and "\n" not in err
    assert _snapshot(root) == before  # not even the demo data was written


def test_overwrite_writes_but_deletes_nothing_it_did_not_write(tmp_path, data, tiny_model):
    root = _foreign(tmp_path / "theirs")
    one = {"n_workers": None, "workers": "in_process"}  # no worker processes to start
    cfg = config_from_dict(pipeline_config(root, data, tiny_model, overwrite=True, cluster=one))
    run(cfg, stop_after="batch")
    assert (root / "shards" / "shard-00099.parquet").is_file()  # another program's: kept
    assert (root / "report.html").read_text() == "<p>someone else's report</p>"
    assert (root / outdir.MARKER).is_file() and list((root / "shards").glob("shard-0000*.parquet"))
    outdir.check(root)  # a curate run now: the next run needs no flag


# --- the shard writer deletes only the shard files curate recorded --------------------------------


def test_write_shards_keeps_files_it_did_not_write(tmp_path):
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    pq.write_table(pa.table({"x": [1]}), shard_dir / "shard-00099.parquet")
    (shard_dir / "notes.txt").write_text("mine")
    assert len(shards.write_shards(_rows(6), shard_dir, 1)) == 6
    assert len(shards.write_shards(_rows(2), shard_dir, 1)) == 2  # a rerun writing fewer
    names = sorted(p.name for p in shard_dir.iterdir())
    ours = ["shard-00000.parquet", "shard-00001.parquet", "shard-00099.parquet"]
    assert names == ["notes.txt", *ours]


def test_shards_of_a_crashed_write_are_recorded_before_they_exist(tmp_path):
    shard_dir = tmp_path / "shards"
    script = ("import sys; sys.path.insert(0, 'tests'); from pathlib import Path; "
              "from test_outdir import _rows; from curate.batch import shards; "
              f"shards.write_shards(_rows(5), Path({str(shard_dir)!r}), 1)")  # fmt: skip
    env = {**os.environ, faults.ENV: "shard:2"}  # SIGKILL once 2 of the 5 files are in place
    proc = subprocess.run([sys.executable, "-c", script], env=env, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert len(list(shard_dir.glob("shard-*.parquet"))) == 2
    shards.write_shards(_rows(1), shard_dir, 1)  # the rerun writes fewer: both leftovers go
    assert sorted(p.name for p in shard_dir.iterdir()) == ["shard-00000.parquet"]


def test_an_older_manifest_inside_the_folder_names_its_files(tmp_path):
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    for name in ("shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"):
        pq.write_table(pa.table({"x": [1]}), shard_dir / name)
    files = [{"path": "shard-00001.parquet"}, {"path": "shard-00002.parquet"}, {"path": "../x"}]
    (tmp_path / "x").write_text("outside")
    (shard_dir / shards.MANIFEST).write_text(
        json.dumps({"format": "curate-shards/1", "files": files})
    )
    shards.write_shards(_rows(1), shard_dir, 1)
    assert sorted(p.name for p in shard_dir.glob("*.parquet")) == ["shard-00000.parquet"]
    assert (tmp_path / "x").read_text() == "outside"  # a listed path outside the folder: never


# --- curate export --to --------------------------------------------------------------------------


def test_export_to_a_foreign_folder_or_file_is_refused(tmp_path):
    theirs = _foreign(tmp_path / "theirs")
    with pytest.raises(OutputDirError, match=r"^--to: .*theirs is not empty.*--overwrite"):
        outdir.check_export(theirs)
    (tmp_path / "train.jsonl").write_text('{"their": "data"}\n')
    with pytest.raises(OutputDirError, match="train.jsonl exists and was not written"):
        outdir.check_export(tmp_path / "train.jsonl")
    (tmp_path / "new.json").write_text("{}")  # where the counts of an export to new/ would go
    with pytest.raises(OutputDirError, match="new.json exists and is not the counts"):
        outdir.check_export(tmp_path / "new")
    outdir.check_export(theirs, overwrite=True)
    outdir.check_export(tmp_path / "other")  # new paths and empty folders are fine
    (tmp_path / "empty").mkdir()
    outdir.check_export(tmp_path / "empty")


def test_export_again_to_a_curate_export_is_accepted(tmp_path):
    (tmp_path / "st").mkdir()
    (tmp_path / "st" / "train.parquet").write_bytes(b"x")
    (tmp_path / "st.json").write_text(json.dumps({"format": "sentence-transformers",
                                                  "num_negatives": 3}))  # fmt: skip
    outdir.check_export(tmp_path / "st")
    (tmp_path / "old").mkdir()  # an export from before the counts file: its batches.json
    (tmp_path / "old" / "batches.json").write_text(json.dumps({"batch_sizes": [2]}))
    outdir.check_export(tmp_path / "old")


@pytest.fixture(scope="module")
def curate_run(tmp_path_factory, data, tiny_model) -> Path:
    root = tmp_path_factory.mktemp("run") / "out"
    one = {"n_workers": None, "workers": "in_process"}
    run(config_from_dict(pipeline_config(root, data, tiny_model, cluster=one)), stop_after="batch")
    return root


@pytest.mark.parametrize("fmt", ["sentence-transformers", "flagembedding"])
def test_cli_export_to_a_foreign_folder_exits_2_unless_overwrite(curate_run, tmp_path, fmt, capsys):
    theirs = _foreign(tmp_path / "theirs")
    before = _snapshot(tmp_path)
    argv = ["export", str(curate_run), "--format", fmt, "--to", str(theirs), "-q"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --to:") and "--overwrite" in err and "\n" not in err
    assert _snapshot(tmp_path) == before
    assert cli.main([*argv, "--overwrite"]) == 0
    after = _snapshot(tmp_path)
    assert all(after[name] == data for name, data in before.items())  # added to, nothing replaced
    if fmt == "sentence-transformers":  # its batches.json marks a curate export: again, no flag
        assert cli.main(argv) == 0


def test_cli_export_to_a_foreign_file_exits_2(curate_run, tmp_path, capsys):
    theirs = tmp_path / "train.jsonl"
    theirs.write_text('{"query": "theirs"}\n')
    argv = ["export", str(curate_run), "--format", "flagembedding", "--to", str(theirs), "-q"]
    assert cli.main(argv) == 2
    assert "train.jsonl exists and was not written by curate export" in capsys.readouterr().err
    assert theirs.read_text() == '{"query": "theirs"}\n'
