"""The scheduler traffic meter (pipelines.traffic) on a real in-process LocalCluster: a task
that carries data is measured as carrying it, one that names a future is not, and a result's
size is what the worker holds."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from pipelines import traffic


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0",
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as c:  # fmt: skip
        yield c


def test_key_prefix_is_the_first_word():
    assert traffic.key_prefix("embed-0123abcd") == "embed"
    assert traffic.key_prefix("index-index.shard-00000-of-00002.faiss-0-9") == "index"
    assert traffic.key_prefix(("search-x", 3)) == "search"


def test_meter_counts_data_in_arguments_and_results_per_prefix(client):
    traffic.register(client)
    vectors = np.zeros((1000, 100), np.float32)  # 400 KB as an argument
    a = client.submit(np.sum, vectors, key="embed-a", pure=False)
    b = client.submit(np.ones, 2000, key="mine-b", pure=False)  # a 16 KB result
    c = client.submit(len, b, key="search-c", pure=False)  # an argument that names a future
    assert client.gather([a, c]) == [0.0, 2000]
    got = traffic.traffic(client)["prefixes"]
    assert got["embed"]["tasks"] == 1 and got["embed"]["arg_max"] >= vectors.nbytes
    assert got["mine"]["result_max"] >= 2000 * 8 > got["mine"]["arg_max"]
    assert got["search"]["arg_max"] < 1024, "a future argument was counted as its data"
    assert got["search"]["results"] == 1 and got["search"]["result_max"] < 1024


def test_registering_again_starts_a_fresh_record(client):
    traffic.register(client)
    client.submit(np.sum, np.zeros(10), key="embed-fresh", pure=False).result()
    traffic.register(client)
    assert traffic.traffic(client)["prefixes"] == {}
