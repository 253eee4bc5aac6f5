"""Stage one on dask.distributed: a LocalCluster writes the store one process writes, and a worker
killed mid-run costs only the block it held."""

import logging
import os
import signal
import threading
import time

import pytest
from distributed import Client, LocalCluster

from conftest import assert_same_store, invoke
from pipeline.cache import TeacherStore


def extract_args(teachers, store, *extra):
    return ["extract-teachers", "--split", "test", "--teachers", ",".join(map(str, teachers)), "--store", store,
            "--block-size", 32, *extra]


@pytest.fixture(scope="module")
def serial_store(teachers, tmp_path_factory):
    store = tmp_path_factory.mktemp("serial") / "store.zarr"
    invoke(*extract_args(teachers, store))
    return store


def test_a_local_cluster_of_two_processes_writes_the_serial_store(teachers, serial_store, tmp_path):
    store = tmp_path / "dask.zarr"
    result = invoke(*extract_args(teachers, store, "--scheduler", "local:2"))
    assert "12 of 12 blocks to extract on dask (local:2)" in result.output
    assert_same_store(store, serial_store)
    assert "0 of 12 blocks to extract" in invoke(*extract_args(teachers, store, "--scheduler", "local:2")).output


def test_a_worker_killed_mid_run_costs_only_its_block(teachers, serial_store, tmp_path):
    store, outcome = tmp_path / "dask.zarr", []
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        pids = client.run(os.getpid)
        run = threading.Thread(target=lambda: outcome.append(
            invoke(*extract_args(teachers, store, "--scheduler", cluster.scheduler_address))))
        run.start()
        deadline, busy = time.time() + 120, []
        while not busy and run.is_alive() and time.time() < deadline:
            busy = [worker for worker, tasks in client.processing().items() if tasks and worker in pids]
            time.sleep(0.02)
        assert busy, "no worker ever held a block"
        os.kill(pids[busy[0]], signal.SIGKILL)
        killed_at = len(TeacherStore.open(store).finished_blocks(TeacherStore.open(store).teachers))
        run.join(timeout=300)
    assert outcome, "the extraction did not finish"
    assert killed_at < 12, "the kill landed after the last block"
    assert_same_store(store, serial_store)


@pytest.mark.parametrize("scheduler", ["local:0", "local:two", "localhost:8786"])
def test_a_malformed_scheduler_is_refused_before_any_store_is_made(teachers, tmp_path, scheduler):
    result = invoke(*extract_args(teachers, tmp_path / "s.zarr", "--scheduler", scheduler), exit_code=1)
    assert f"unknown --scheduler '{scheduler}'; choose local:N" in result.output
    assert not (tmp_path / "s.zarr").exists()
