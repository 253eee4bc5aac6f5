"""Stage two's reader: batches streamed from a teacher store, whole blocks at a time.

Workers open the store lazily inside their own process (zarr v3 runs I/O on an asyncio
thread, which must not be inherited through fork), take every n-th block of a shared
shuffled order, and shuffle rows within a window of `mix_blocks` blocks. The plan of an
epoch (which worker reads which windows) is a pure function of (seed, epoch), so the
number of batches is known exactly before the epoch runs (the learning-rate schedule
depends on it). In each epoch a block's rows are read at one of the store's views
(views.epoch_view: every view once in K epochs), and "images" are that view of each
sample, rendered at the data set's size from the stored image or the image file.

In one process (no workers), a stream whose arrays decode to at most `hold_bytes` keeps the
blocks it has read, checked, and reads each from disk once per run (a file damaged after that
read is found by the next run or `pipeline store verify`); with workers every epoch reads them again
(each epoch's workers are new processes).
"""

import math
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.store.cache import ShardCache
from pipeline.store.layout import is_viewed
from pipeline.store.location import Bucket
from pipeline.store.teacher_store import TeacherStore
from pipeline.device_views import DeviceDecoder, EncodedImage, read_encoded, require_cuda
from pipeline.views import PixelSource, ViewPolicy, decodes_on_gpu, epoch_view, gpu_decoder, image_decoder

HOLD_BYTES = 2**30
PREFETCH_WINDOWS = 2  # windows read ahead from a bucket (a folder's reads are read ahead by the page cache)


class BlockStream(torch.utils.data.IterableDataset):
    """Yields dicts {array path: tensor} of up to `batch_size` rows, plus "index" (the store rows);
    use DataLoader(batch_size=None, num_workers=workers), with multiprocessing_context="forkserver" for workers
    (obstore, a bucket's client, cannot run in a process forked from one that used it).

    Rows whose image was unreadable at extraction (`valid` False) are left out. With
    `dataset`, "images" come from the data set's files (stores of large images hold none).
    With `eval_view`, every epoch reads view 0 (the eval view) only.
    """

    def __init__(self, path: str, fields: list[str], blocks: list[int], batch_size: int,
                 seed: int = 0, mix_blocks: int = 2, shuffle: bool = True, dataset=None, workers: int = 0,
                 hold_bytes: int = HOLD_BYTES, eval_view: bool = False, rank: int = 0, ranks: int = 1,
                 cache_dir: str | None = None, cache_bytes: int = 0, prefetch: int | None = None,
                 device: torch.device = torch.device("cpu")):
        super().__init__()
        self.path, self.fields, self.blocks = str(path), list(fields), list(blocks)
        self.cache_dir, self.cache_bytes = cache_dir, cache_bytes
        self.batch_size, self.seed, self.mix_blocks, self.shuffle = batch_size, seed, max(1, mix_blocks), shuffle
        self.dataset, self.workers = dataset, max(1, workers)
        self.rank, self.ranks = rank, ranks
        self.epoch = 0
        store = self.open()
        self.prefetch = (PREFETCH_WINDOWS if isinstance(store.location, Bucket) else 0) if prefetch is None else prefetch
        self.views = 1 if eval_view else store.num_views
        self.size = tuple(store.attrs["dataset"]["image_shape"][:2])  # the student's images
        geometry = dataset.info.geometry if dataset is not None else None
        self.interpolation = geometry.interpolation if geometry else "bilinear"
        self.policy, self.block_size = ViewPolicy(**store.attrs["views"]), store.block_size
        files = dataset is not None and "images" in self.fields
        self.decoder = None  # views cut on the device by this process, from bytes the workers read
        if files and decodes_on_gpu(self.policy.decoder):
            require_cuda(device, f"store {self.path} was extracted with --decode gpu, so its students decode",
                         "train on a machine with one, or extract a store with --decode cpu")
            self.decoder = DeviceDecoder(device)
        here = gpu_decoder() if self.decoder else image_decoder()
        if files and self.policy.decoder != here:
            raise PipelineError(f"store {self.path} cut its views with {self.policy.decoder}, and this machine has "
                                f"{here}, whose pixels may differ; install those builds, or extract a new store here")
        wanted = [f for f in self.fields if not (f == "images" and dataset is not None)]
        self.stored = wanted + ["valid"] + (["view_boxes", "view_flips"] if "images" in self.fields else [])
        self.valid_rows = {b: int(store.read_rows(*store.block_rows(b), ["valid"])["valid"].sum()) for b in self.blocks}
        decoded = len(self.blocks) * store.block_size * sum(
            math.prod(store.layout(f).row_shape) * store.layout(f).dtype.itemsize * (self.views if is_viewed(f) else 1)
            for f in self.stored)
        self.held: dict[tuple[int, int], dict] | None = {} if workers == 0 and decoded <= hold_bytes else None

    def open(self) -> TeacherStore:
        """The store, opened in this process (each loader worker opens its own), with the shard cache if any."""
        cache = ShardCache(self.cache_dir, self.cache_bytes) if self.cache_dir else None
        return TeacherStore.open(self.path, cache=cache)

    def view(self, epoch: int, block: int) -> int:
        return epoch_view(self.seed, epoch, block, self.views)

    def read_block(self, store: TeacherStore, block: int, view: int) -> dict:
        """The stored arrays' rows of `block` at `view`: from memory if held, else from the store (and held)."""
        if self.held is not None and (block, view) in self.held:
            return self.held[block, view]
        rows = store.read_rows(*store.block_rows(block), self.stored, view)
        if self.held is not None:
            self.held[block, view] = rows
        return rows

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def windows(self, epoch: int, worker: int, rank: int | None = None) -> list[list[int]]:
        """The blocks `worker` of `rank` (default: this stream's) reads in `epoch`, grouped into the windows
        whose rows are shuffled together: the epoch's block order dealt to the ranks, then to their workers."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.blocks) if self.shuffle \
            else np.asarray(self.blocks)
        rank = self.rank if rank is None else rank
        mine = [int(b) for b in order[rank::self.ranks][worker::self.workers]]
        return [mine[i:i + self.mix_blocks] for i in range(0, len(mine), self.mix_blocks)]

    def num_batches(self, epoch: int, rank: int | None = None) -> int:
        """Exactly the batches all workers of `rank` together yield in `epoch` (each window ends in a
        partial batch)."""
        return sum(-(-sum(self.valid_rows[b] for b in window) // self.batch_size)
                   for worker in range(self.workers) for window in self.windows(epoch, worker, rank))

    def steps(self, epoch: int) -> int:
        """The optimizer steps of `epoch` on every rank: the most batches any rank has."""
        return max(self.num_batches(epoch, rank) for rank in range(self.ranks))

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if workers != self.workers:
            raise ValueError(f"BlockStream planned for {self.workers} worker(s) runs in {workers}; "
                             "pass the DataLoader's num_workers as `workers`")
        rng = np.random.default_rng([self.seed, self.epoch, worker + 1])
        store = self.open()
        stored = [f for f in self.stored if f != "valid"]
        for window, parts in self.read_windows(store, self.epoch, self.windows(self.epoch, worker)):
            spans = [store.block_rows(b) for b in window]
            kept = np.flatnonzero(np.concatenate([p["valid"] for p in parts]))
            order = kept[rng.permutation(len(kept))] if self.shuffle else kept  # one take per array and window:
            rows = {f: np.concatenate([p[f] for p in parts])[order] for f in stored}  # batches are slices of it
            index = np.concatenate([np.arange(start, stop) for start, stop in spans])[order]
            for s in range(0, len(index), self.batch_size):
                batch = {f: torch.from_numpy(rows[f][s:s + self.batch_size]) for f in stored}
                batch["index"] = torch.from_numpy(index[s:s + self.batch_size])
                if "images" in self.fields and self.decoder:
                    batch["encoded"] = self.encoded_images(batch)
                elif "images" in self.fields:
                    batch["images"] = self.view_images(batch)
                yield batch

    def read_windows(self, store: TeacherStore, epoch: int, windows: list[list[int]]):
        """(window, its blocks' rows) in order; with `prefetch`, the blocks of that many windows ahead are read by
        threads meanwhile (a bucket's requests overlap each other and the training step)."""
        read = lambda block: self.read_block(store, block, self.view(epoch, block))  # noqa: E731
        if not self.prefetch:
            yield from ((window, [read(block) for block in window]) for window in windows)
            return
        with ThreadPoolExecutor(max_workers=self.prefetch * self.mix_blocks) as pool:
            pending = deque()
            for window in windows:
                pending.append((window, [pool.submit(read, block) for block in window]))
                if len(pending) > self.prefetch:
                    done, futures = pending.popleft()
                    yield done, [future.result() for future in futures]
            while pending:
                done, futures = pending.popleft()
                yield done, [future.result() for future in futures]

    def view_images(self, batch: dict) -> torch.Tensor:
        """uint8 (B, H, W, C): each row's view (its box and flip) of its stored image or image file."""
        boxes, flips = batch.pop("view_boxes").tolist(), batch.pop("view_flips").tolist()
        if self.dataset is None:
            sources = [PixelSource(image) for image in batch["images"].numpy()]
        else:
            sources = [self.file_source(int(r), box, flip) for r, box, flip in zip(batch["index"], boxes, flips)]
        return torch.from_numpy(np.stack([source.view(box, flip, self.size, self.interpolation)
                                          for source, box, flip in zip(sources, boxes, flips)]))

    def encoded_images(self, batch: dict) -> list[EncodedImage]:
        """Each row's image file, read (bytes and header size) for the device to decode (`on_device`)."""
        return [read_encoded(source)
                for source in (self.file_source(int(r), box, flip) for r, box, flip in
                               zip(batch["index"], batch["view_boxes"].tolist(), batch["view_flips"].tolist()))]

    def on_device(self, batch: dict) -> dict:
        """A batch of a stream whose views are cut on the device, with its "images" (B, H, W, C) cut there: in the
        process that trains (loader workers read bytes only); other batches pass unchanged."""
        if self.decoder is None:
            return batch
        boxes, flips = batch.pop("view_boxes"), batch.pop("view_flips")
        encoded = batch.pop("encoded")
        (images,), errors = self.decoder.views(encoded, boxes[:, None], flips[:, None],
                                               [(self.size, self.interpolation)], [""] * len(encoded))
        bad = next((error for error in errors if error), None)
        if bad:
            raise PipelineError(f"{bad.split('; ')[0]}, which was readable when store {self.path} was extracted; "
                                "restore the file as it was")
        batch["images"] = images[:, 0]
        return batch

    def file_source(self, row: int, box: list[int], flip: bool):
        """The image file of `row` (decoded as stage one decoded it), checked to be the image its stored
        view was drawn for (a file replaced since extraction, say resized, would be cut where the teacher
        never looked)."""
        source = self.dataset.view_source(row, self.policy.draft)
        view = self.view(self.epoch, row // self.block_size)
        boxes, flips = self.policy.boxes(self.dataset.sample_id(row), source.height, source.width)
        if boxes[view].tolist() != box or bool(flips[view]) != flip:
            raise PipelineError(
                f"image {self.dataset.describe(row)} is not the image store {self.path} cut its views from (it is "
                f"{source.width}x{source.height} now, and view {view} was {box}); restore the file as it was "
                "at extraction, or extract a new store")
        return source
