"""Stage two's reader: batches streamed from a teacher store, whole blocks at a time.

Workers open the store lazily inside their own process (zarr v3 runs I/O on an asyncio
thread, which must not be inherited through fork), take every n-th block of a shared
shuffled order, and shuffle rows within a window of `mix_blocks` blocks. The plan of an
epoch (which worker reads which windows) is a pure function of (seed, epoch), so the
number of batches is known exactly before the epoch runs (the learning-rate schedule
depends on it).

In one process (no workers), a stream whose arrays decode to at most `hold_bytes` keeps the
blocks it has read, checked, and reads each from disk once per run (a file damaged after that
read is found by the next run or `cache verify`); with workers every epoch reads them again
(each epoch's workers are new processes).
"""

import math

import numpy as np
import torch

from pipeline.cache import TeacherStore

HOLD_BYTES = 2**30


class BlockStream(torch.utils.data.IterableDataset):
    """Yields dicts {array path: tensor} of up to `batch_size` rows, plus "index" (the store rows);
    use DataLoader(batch_size=None, num_workers=workers).

    Rows whose image was unreadable at extraction (`valid` False) are left out. With
    `dataset`, "images" come from the data set's files (stores of large images hold none).
    """

    def __init__(self, path: str, fields: list[str], blocks: list[int], batch_size: int,
                 seed: int = 0, mix_blocks: int = 2, shuffle: bool = True, dataset=None, workers: int = 0,
                 hold_bytes: int = HOLD_BYTES):
        super().__init__()
        self.path, self.fields, self.blocks = str(path), list(fields), list(blocks)
        self.batch_size, self.seed, self.mix_blocks, self.shuffle = batch_size, seed, max(1, mix_blocks), shuffle
        self.dataset, self.workers = dataset, max(1, workers)
        self.epoch = 0
        self.stored = [f for f in self.fields if not (f == "images" and dataset is not None)] + ["valid"]
        store = TeacherStore.open(self.path)
        self.valid_rows = {b: int(store.read_rows(*store.block_rows(b), ["valid"])["valid"].sum()) for b in self.blocks}
        decoded = len(self.blocks) * store.block_size * sum(
            math.prod(store.layout(f).row_shape) * store.layout(f).dtype.itemsize for f in self.stored)
        self.held: dict[int, dict] | None = {} if workers == 0 and decoded <= hold_bytes else None

    def read_block(self, store: TeacherStore, block: int) -> dict:
        """The stored arrays' rows of `block`: from memory if held, else from the store (and held)."""
        if self.held is not None and block in self.held:
            return self.held[block]
        rows = store.read_rows(*store.block_rows(block), self.stored)
        if self.held is not None:
            self.held[block] = rows
        return rows

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def windows(self, epoch: int, worker: int) -> list[list[int]]:
        """The blocks `worker` reads in `epoch`, grouped into the windows whose rows are shuffled together."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.blocks) if self.shuffle \
            else np.asarray(self.blocks)
        mine = [int(b) for b in order[worker::self.workers]]
        return [mine[i:i + self.mix_blocks] for i in range(0, len(mine), self.mix_blocks)]

    def num_batches(self, epoch: int) -> int:
        """Exactly the batches all workers together yield in `epoch` (each window ends in a partial batch)."""
        return sum(-(-sum(self.valid_rows[b] for b in window) // self.batch_size)
                   for worker in range(self.workers) for window in self.windows(epoch, worker))

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if workers != self.workers:
            raise ValueError(f"BlockStream planned for {self.workers} worker(s) runs in {workers}; "
                             "pass the DataLoader's num_workers as `workers`")
        rng = np.random.default_rng([self.seed, self.epoch, worker + 1])
        store = TeacherStore.open(self.path)
        stored = self.stored[:-1]  # all but "valid"
        for window in self.windows(self.epoch, worker):
            spans = [store.block_rows(b) for b in window]
            parts = [self.read_block(store, b) for b in window]
            kept = np.flatnonzero(np.concatenate([p["valid"] for p in parts]))
            order = kept[rng.permutation(len(kept))] if self.shuffle else kept  # one take per array and window:
            rows = {f: np.concatenate([p[f] for p in parts])[order] for f in stored}  # batches are slices of it
            index = np.concatenate([np.arange(start, stop) for start, stop in spans])[order]
            for s in range(0, len(index), self.batch_size):
                batch = {f: torch.from_numpy(rows[f][s:s + self.batch_size]) for f in stored}
                batch["index"] = torch.from_numpy(index[s:s + self.batch_size])
                if len(stored) < len(self.fields):
                    batch["images"] = torch.from_numpy(np.stack([self.dataset.image(int(r)) for r in batch["index"]]))
                yield batch
