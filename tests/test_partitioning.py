"""Partitioning is a unit of work and resume, never of content: the same input and seed give the
same bytes whatever ``embed.partition_size`` and ``mine.query_partition`` are."""

from __future__ import annotations

from pathlib import Path

import pytest
from slice_data import output_bytes, pipeline_config, write_slice

from curate.config import config_from_dict
from pipelines.run import run

IN_PROCESS = {"workers": "in_process"}


def _run(out: Path, data: Path, model: Path, partition_size: int, query_partition: int) -> dict:
    cfg = pipeline_config(
        out, data, model, cluster=IN_PROCESS,
        embed={"partition_size": partition_size}, mine={"query_partition": query_partition},
    )  # fmt: skip
    run(config_from_dict(cfg), quiet=True)
    return output_bytes(out)


def _without(got: dict, section: str, key: str) -> dict:
    """The manifest's config without the setting the compared runs differ in by design."""
    got["manifest.json"]["config"][section].pop(key)
    return got


def _assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in sorted(a):
        assert a[name] == b[name], f"{name} differs between partition sizes"


def test_shards_do_not_depend_on_embed_partition_size(tmp_path, cranfield, tiny_model):
    """Batches are cut over all texts of a kind: 7 texts per task or all in one, same bytes."""
    data = write_slice(tmp_path / "data", cranfield)
    small = _run(tmp_path / "small", data, tiny_model, partition_size=7, query_partition=8)
    large = _run(tmp_path / "large", data, tiny_model, partition_size=1000, query_partition=8)
    _assert_same(
        _without(small, "embed", "partition_size"), _without(large, "embed", "partition_size")
    )


@pytest.fixture
def blas_search():
    """Flat search through BLAS for every query count, as faiss does once queries x docs reach
    its threshold (128,000: a 2,048-query block on any corpus over 62 docs); BLAS sums in an
    order that depends on how many queries share the call."""
    import faiss

    before = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 0
    yield
    faiss.cvar.distance_compute_blas_threshold = before


def test_shards_do_not_depend_on_mine_query_partition(tmp_path, cranfield, tiny_model, blas_search):
    """Queries are searched on a fixed grid whatever the mining blocks: 3 per block or 40."""
    data = write_slice(tmp_path / "data", cranfield)
    small = _run(tmp_path / "small", data, tiny_model, partition_size=60, query_partition=3)
    large = _run(tmp_path / "large", data, tiny_model, partition_size=60, query_partition=64)
    _assert_same(
        _without(small, "mine", "query_partition"), _without(large, "mine", "query_partition")
    )
