"""Stage one on dask.distributed: a LocalCluster writes the store one process writes, and a worker
killed mid-run costs only the block it held."""

import logging
import os
import signal
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from distributed import Client, LocalCluster

from conftest import assert_same_store, extract_args, invoke
from pipeline import cluster
from pipeline.cluster import connect
from pipeline.store.teacher_store import TeacherStore


def split_test_args(teachers, store, *extra):
    return extract_args(teachers, store, "--split", "test", *extra)  # 360 images: 12 blocks


@pytest.fixture(scope="module")
def serial_store(digits_test_store):
    return digits_test_store  # conftest's extraction of the test split: split_test_args, in one process


@pytest.mark.slow  # a dask cluster, the default set's slowest test: CI runs it
def test_a_local_cluster_of_two_processes_writes_the_serial_store(teachers, serial_store, tmp_path):
    store = tmp_path / "dask.zarr"
    result = invoke(*split_test_args(teachers, store, "--scheduler", "local:2"))
    assert "12 of 12 blocks to extract on dask (local:2)" in result.output
    assert_same_store(store, serial_store)
    assert "0 of 12 blocks to extract" in invoke(*split_test_args(teachers, store, "--scheduler", "local:2")).output


@pytest.mark.slow
def test_a_worker_killed_mid_run_costs_only_its_block(teachers, serial_store, tmp_path):
    store, outcome = tmp_path / "dask.zarr", []
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        pids = client.run(os.getpid)
        run = threading.Thread(target=lambda: outcome.append(
            invoke(*split_test_args(teachers, store, "--scheduler", cluster.scheduler_address))))
        run.start()
        deadline, busy = time.time() + 120, []
        while not busy and run.is_alive() and time.time() < deadline:
            busy = [worker for worker, tasks in client.processing().items() if worker in pids
                    and any(str(task).startswith("extract-block") for task in tasks)]  # not a teacher's judging
            time.sleep(0.02)
        assert busy, "no worker ever held a block"
        os.kill(pids[busy[0]], signal.SIGKILL)
        killed_at = len(TeacherStore.open(store).finished_blocks(TeacherStore.open(store).teachers))
        run.join(timeout=300)
    assert outcome, "the extraction did not finish"
    assert killed_at < 12, "the kill landed after the last block"
    assert_same_store(store, serial_store)


@pytest.mark.slow  # a dask cluster each
def test_workers_that_run_two_tasks_at_once_are_refused(teachers, tmp_path):
    """Two tasks in one process would share the teachers' Grad-CAM hooks (silently wrong maps)."""
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0",
                      silence_logs=logging.ERROR) as cluster:
        result = invoke(*split_test_args(teachers, tmp_path / "s.zarr", "--scheduler", cluster.scheduler_address),
                        exit_code=1)
    assert "runs 2 threads; start workers with one thread each (dask worker --nthreads 1" in result.output
    assert TeacherStore.open(tmp_path / "s.zarr").teachers == []  # refused at the first task (a teacher's judging)


@pytest.mark.slow
def test_local_workers_keep_their_settings_when_the_nanny_restarts_them():
    """Non-daemonic (so they may start DataLoader workers), no malloc trim threshold, torch's threads the
    cores shared out: also in a worker started again after one died."""
    def settings():
        import multiprocessing  # noqa: PLC0415

        import torch  # noqa: PLC0415
        return (multiprocessing.current_process().daemon, os.environ.get("MALLOC_TRIM_THRESHOLD_"),
                os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads())

    threads, environ = max(1, os.cpu_count() // 2), dict(os.environ)
    left = {"MALLOC_TRIM_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    os.environ.update(left)  # what a LocalCluster of dask's defaults leaves in the process that started it
    try:
        with connect("local:2") as client:
            before = list(client.run(settings).values())
            client.restart()
            after = list(client.run(settings).values())
        assert before == after == [(False, None, str(threads), threads)] * 2
        assert dict(os.environ) == {**environ, **left}  # this process's environment, as it was
    finally:
        os.environ.clear()
        os.environ.update(environ)


def test_a_worker_takes_the_gpu_of_its_number_and_makes_it_current(monkeypatch):
    chosen = []
    monkeypatch.setattr(cluster, "get_worker", lambda: SimpleNamespace(name=3))
    monkeypatch.setattr(cluster, "resolve_device", lambda name: torch.device(name))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert cluster.worker_device("cuda") == torch.device("cuda", 1)  # worker 3 of 2 GPUs: GPU 1
    assert cluster.worker_device("cuda:0") == torch.device("cuda", 0)  # a GPU named is kept
    assert chosen == [torch.device("cuda", 1), torch.device("cuda", 0)]
    assert cluster.worker_device("cpu") == torch.device("cpu") and len(chosen) == 2


@pytest.mark.parametrize("scheduler", ["local:0", "local:two", "localhost:8786"])
def test_a_malformed_scheduler_is_refused_before_any_store_is_made(teachers, tmp_path, scheduler):
    result = invoke(*split_test_args(teachers, tmp_path / "s.zarr", "--scheduler", scheduler), exit_code=1)
    assert f"unknown --scheduler '{scheduler}'; choose local:N" in result.output
    assert not (tmp_path / "s.zarr").exists()
