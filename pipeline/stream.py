"""Stage two's reader: batches streamed from a teacher store, whole blocks at a time.

Workers open the store lazily inside their own process (zarr v3 runs I/O on an asyncio
thread, which must not be inherited through fork), take every n-th block of a shared
shuffled order, and shuffle rows within a window of `mix_blocks` blocks.
"""

import numpy as np
import torch

from pipeline.cache import TeacherStore


class BlockStream(torch.utils.data.IterableDataset):
    """Yields dicts {array path: tensor} of up to `batch_size` rows; use DataLoader(batch_size=None).

    Rows whose image was unreadable at extraction (`valid` False) are left out. With
    `dataset`, "images" come from the data set's files (stores of large images hold none).
    """

    def __init__(self, path: str, fields: list[str], blocks: list[int], batch_size: int,
                 seed: int = 0, mix_blocks: int = 2, shuffle: bool = True, dataset=None):
        super().__init__()
        self.path, self.fields, self.blocks = str(path), list(fields), list(blocks)
        self.batch_size, self.seed, self.mix_blocks, self.shuffle = batch_size, seed, max(1, mix_blocks), shuffle
        self.dataset = dataset
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
        stored = [f for f in self.fields if not (f == "images" and self.dataset is not None)]
        for i in range(0, len(mine), self.mix_blocks):
            window = [store.block_rows(int(b)) for b in mine[i:i + self.mix_blocks]]
            parts = [store.read_rows(start, stop, [*stored, "valid"]) for start, stop in window]
            valid = np.concatenate([p["valid"] for p in parts])
            rows = {f: np.concatenate([p[f] for p in parts])[valid] for f in stored}
            index = np.concatenate([np.arange(start, stop) for start, stop in window])[valid]
            perm = rng.permutation(len(index)) if self.shuffle else np.arange(len(index))
            for s in range(0, len(index), self.batch_size):
                take = perm[s:s + self.batch_size]
                batch = {f: torch.from_numpy(rows[f][take]) for f in stored}
                if len(stored) < len(self.fields):
                    batch["images"] = torch.from_numpy(np.stack([self.dataset.image(int(r)) for r in index[take]]))
                yield batch

    def approx_num_batches(self, store: TeacherStore) -> int:
        """Batches per epoch, give or take one per window: for progress bars and the LR schedule."""
        rows = sum(stop - start for start, stop in map(store.block_rows, self.blocks))
        return -(-rows // self.batch_size)
