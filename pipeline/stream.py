"""Stage two's reader: batches streamed from a teacher store, whole blocks at a time.

Workers open the store lazily inside their own process (zarr v3 runs I/O on an asyncio
thread, which must not be inherited through fork), take every n-th block of a shared
shuffled order, and shuffle rows within a window of `mix_blocks` blocks.
"""

import numpy as np
import torch

from pipeline.cache import TeacherStore


class BlockStream(torch.utils.data.IterableDataset):
    """Yields dicts {array path: tensor} of up to `batch_size` rows; use DataLoader(batch_size=None)."""

    def __init__(self, path: str, fields: list[str], blocks: list[int], batch_size: int,
                 seed: int = 0, mix_blocks: int = 2, shuffle: bool = True):
        super().__init__()
        self.path, self.fields, self.blocks = str(path), list(fields), list(blocks)
        self.batch_size, self.seed, self.mix_blocks, self.shuffle = batch_size, seed, max(1, mix_blocks), shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        order_rng = np.random.default_rng([self.seed, self.epoch])
        order = order_rng.permutation(self.blocks) if self.shuffle else np.asarray(self.blocks)
        mine = order[worker::workers]
        rng = np.random.default_rng([self.seed, self.epoch, worker + 1])
        store = TeacherStore.open(self.path)
        for i in range(0, len(mine), self.mix_blocks):
            parts = [store.read_rows(*store.block_rows(int(b)), self.fields) for b in mine[i:i + self.mix_blocks]]
            rows = {f: np.concatenate([p[f] for p in parts]) for f in self.fields}
            count = len(rows[self.fields[0]])
            perm = rng.permutation(count) if self.shuffle else np.arange(count)
            for s in range(0, count, self.batch_size):
                take = perm[s:s + self.batch_size]
                yield {f: torch.from_numpy(rows[f][take]) for f in self.fields}

    def approx_num_batches(self, store: TeacherStore) -> int:
        """Batches per epoch, give or take one per window: for progress bars and the LR schedule."""
        rows = sum(stop - start for start, stop in map(store.block_rows, self.blocks))
        return -(-rows // self.batch_size)
