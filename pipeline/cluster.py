"""Stage one on dask.distributed: one task per block, run by worker processes that load the data
set and the teachers with their first task and keep them for the next.

The client creates the store and registers the teachers before any task runs (advisory locks
are not reliable on every shared file system); a task writes its block's shard files and
progress marks straight into the store, so no array travels through the client. A worker
that dies loses only the block it held: the scheduler gives the block to another worker
(up to `distributed.scheduler.allowed-failures` deaths per block), and a rerun of the whole
command resumes from the blocks marked finished.
"""

import json
import logging
import os
from contextlib import ExitStack, contextmanager
from dataclasses import asdict

import dask
import torch
from distributed import Client, KilledWorker, LocalCluster, as_completed, get_worker

from pipeline.devices import resolve_device
from pipeline.errors import PipelineError

_STATE: dict = {}  # this worker process's loaded job: {key: value}


def worker_state(key: str, load):
    """This worker's value for `key`, loaded by its first task and kept for the next ones (one job at
    a time: a new key drops the last job's teachers). Workers must run one task at a time: two tasks
    in one process would share the teachers' modules, whose Grad-CAM hooks record every forward."""
    threads = get_worker().state.nthreads
    if threads != 1:
        raise PipelineError(f"dask worker {get_worker().address} runs {threads} threads; start workers with one "
                            "thread each (dask worker --nthreads 1, or cores=1 with dask-jobqueue)")
    if key not in _STATE:
        _STATE.clear()
        _STATE[key] = load()
    return _STATE[key]


def worker_device(name: str) -> torch.device:
    """`--device` on a worker; `auto`/`cuda` on a LocalCluster's worker i is GPU i modulo the GPUs, so
    `local:N` with N GPUs gives each worker its own."""
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None:
        worker = get_worker().name
        if isinstance(worker, int):
            device = torch.device("cuda", worker % torch.cuda.device_count())
    if device.type == "cuda":
        torch.cuda.set_device(device)  # else pinned-memory threads open a context on GPU 0 in every worker
    return device


NANNY_ENVIRON = ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@contextmanager
def environ_for_workers():
    """This process's environment without the malloc and thread settings of dask's nannies while a
    LocalCluster lives, and as it was afterwards. Nannies spawn workers with this process's environment,
    in which a value beats the cluster's own settings, and write their settings (and more) into it:
    a cluster started earlier with dask's defaults would pass on its malloc threshold and one thread
    per worker, and ours would leave its thread counts behind."""
    saved = dict(os.environ)
    for name in NANNY_ENVIRON:
        os.environ.pop(name, None)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextmanager
def connect(scheduler: str):
    """A client of a new LocalCluster (`local:N`: N worker processes running one task at a time, torch in
    each using the cores / N, which may start DataLoader workers) or of a running scheduler (`tcp://`)."""
    if scheduler.startswith("local:"):  # ExtractConfig checked the form
        # workers may start DataLoader workers; and no 64 KiB malloc trim threshold, dask's default, under
        # which torch's CPU kernels ran stage one 1.7 times slower (44 s against 25 s, digits, 3 teachers)
        # (set for the cluster's life: a nanny reads them again when it restarts a worker that died)
        workers = int(scheduler.removeprefix("local:"))
        threads = max(1, (os.cpu_count() or 1) // workers)  # torch's intra-op threads: the cores, shared out
        with environ_for_workers(), dask.config.set({"distributed.worker.daemon": False,
                              "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
                              "distributed.nanny.pre-spawn-environ.OMP_NUM_THREADS": threads,
                              "distributed.nanny.pre-spawn-environ.MKL_NUM_THREADS": threads}), \
                LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                             dashboard_address=":0", silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
            yield client
    else:
        try:
            client = Client(scheduler, timeout="30s")
        except (OSError, TimeoutError) as error:
            raise PipelineError(f"no dask scheduler answers at {scheduler} ({error}); start one (`dask scheduler`) "
                                "or pass --scheduler local:N") from None
        with client:
            yield client


class Cluster:
    """The dask client of `scheduler`, connected on first use (a finished store starts no cluster)."""

    def __init__(self, scheduler: str):
        self.scheduler, self._stack, self._client = scheduler, ExitStack(), None

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *failure) -> None:
        self._stack.close()

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = self._stack.enter_context(connect(self.scheduler))
        return self._client

    def judge(self, task, cfg, names: list[str]) -> dict[str, dict | None]:
        """task(cfg, name) for every teacher of `names` on the workers (their devices): its held-out figures."""
        futures = {self.client.submit(task, cfg, name, key=f"judge-{name}-{dask.base.tokenize(asdict(cfg))}",
                                      pure=False): name for name in names}
        return {futures[future]: value for future, value in finished(futures, "judging teacher")}

    def run_blocks(self, task, cfg, pending: dict[str, set[int]], identity: dict, progress) -> None:
        """Run task(cfg, key, block, teachers) for every pending block on the workers, updating `progress` as
        blocks finish and printing what tasks report; the first failure stops the run."""
        blocks = sorted(set().union(*pending.values()))
        if not blocks:
            return
        key = json.dumps({"config": asdict(cfg), "store": identity}, sort_keys=True, default=str)
        if self.client.dashboard_link:
            progress.write(f"dask dashboard: {self.client.dashboard_link}")
        futures = {self.client.submit(task, cfg, key, block, sorted(n for n, b in pending.items() if block in b),
                                      key=f"extract-block-{block}-{dask.base.tokenize(key)}", pure=False): f"block {block}"
                   for block in blocks}
        for _, said in finished(futures, "extracting"):
            for line in said:
                progress.write(line)
            progress.update()


def finished(futures: dict, doing: str):
    """(future, result) as each of `futures` (future -> what it does) finishes; a task whose every worker died
    stops the run in one line, and the others are cancelled."""
    try:
        for future in as_completed(futures):
            try:
                yield future, future.result()
            except KilledWorker as error:
                raise PipelineError(
                    f"{doing} {futures[future]} was running on every worker that died ({error}); finished blocks "
                    "are kept: check the workers' memory and logs, then rerun the same command") from None
    finally:
        if futures:
            next(iter(futures)).client.cancel(list(futures))
