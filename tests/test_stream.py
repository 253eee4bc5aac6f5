"""Stage two's reader: whole blocks, every row once per epoch, reproducible, worker-safe."""

import numpy as np
import torch

from pipeline.cache import TeacherStore
from pipeline.stream import BlockStream

N = 23


def make_store(path):
    identity = {"name": "toy", "split": "train", "num_samples": N, "num_classes": N,
                "image_shape": [2, 2, 1], "ids_sha256": "x"}
    images = np.zeros((N, 2, 2, 1), dtype=np.uint8)
    return TeacherStore.create(path, identity, np.arange(N), images, "label", block_size=4, chunks_per_block=2)


def epoch_rows(stream):
    return [batch["labels"].tolist() for batch in stream]


def test_every_row_once_per_epoch_reading_whole_blocks(tmp_path, monkeypatch):
    store = make_store(tmp_path / "s.zarr")
    reads = []
    original = TeacherStore.read_rows
    monkeypatch.setattr(TeacherStore, "read_rows",
                        lambda self, start, stop, fields: reads.append((start, stop)) or original(self, start, stop, fields))
    stream = BlockStream(str(store.path), ["images", "labels"], list(range(store.num_blocks)), batch_size=5, seed=3)
    batches = epoch_rows(stream)
    assert sorted(sum(batches, [])) == list(range(N))
    assert max(len(b) for b in batches) == 5
    assert sorted(reads) == [store.block_rows(b) for b in range(store.num_blocks)]  # whole shards only


def test_order_depends_on_seed_and_epoch_only(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    stream = BlockStream(str(store.path), ["labels"], list(range(store.num_blocks)), batch_size=4, seed=1)
    first = epoch_rows(stream)
    assert epoch_rows(stream) == first
    stream.set_epoch(1)
    assert epoch_rows(stream) != first
    assert sorted(sum(epoch_rows(stream), [])) == list(range(N))


def test_only_the_given_blocks_are_read(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    stream = BlockStream(str(store.path), ["labels"], [0, 5], batch_size=8, seed=0)
    assert sorted(sum(epoch_rows(stream), [])) == [0, 1, 2, 3, 20, 21, 22]
    assert stream.approx_num_batches(store) == 1


def test_workers_split_the_blocks_without_overlap(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    TeacherStore.open(store.path).read_rows(0, 4, ["labels"])  # the parent has used zarr before forking workers
    stream = BlockStream(str(store.path), ["labels"], list(range(store.num_blocks)), batch_size=3, seed=0)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2,
                                         multiprocessing_context="forkserver")
    rows = sorted(sum((batch["labels"].tolist() for batch in loader), []))
    assert rows == list(range(N))
