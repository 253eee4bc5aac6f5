"""Stage two's reader: whole blocks, every row once per epoch, reproducible, worker-safe."""

import numpy as np
import pytest
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
    stream = BlockStream(str(store.path), ["images", "labels"], list(range(store.num_blocks)), batch_size=5, seed=3)
    reads = []  # of the epoch (the constructor counts each block's valid rows)
    original = TeacherStore.read_rows
    monkeypatch.setattr(TeacherStore, "read_rows",
                        lambda self, start, stop, fields: reads.append((start, stop)) or original(self, start, stop, fields))
    batches = epoch_rows(stream)
    assert sorted(sum(batches, [])) == list(range(N))
    assert max(len(b) for b in batches) == 5
    assert sorted(reads) == [store.block_rows(b) for b in range(store.num_blocks)]  # whole shards only


def test_a_small_store_is_read_from_disk_once_in_one_process(tmp_path, monkeypatch):
    store = make_aligned_store(tmp_path / "s.zarr")
    blocks, fields = list(range(store.num_blocks)), ["images", "labels", "teachers/t/logits", "teachers/t/cam"]
    held = BlockStream(str(store.path), fields, blocks, batch_size=5, seed=3)
    unheld = BlockStream(str(store.path), fields, blocks, batch_size=5, seed=3, hold_bytes=0)
    reads = []
    original = TeacherStore.read_rows
    monkeypatch.setattr(TeacherStore, "read_rows",
                        lambda self, start, stop, fields: reads.append(start) or original(self, start, stop, fields))
    for epoch in range(3):
        held.set_epoch(epoch)
        unheld.set_epoch(epoch)
        for mine, theirs in zip(held, unheld, strict=True):
            assert mine.keys() == theirs.keys()
            for key in mine:
                torch.testing.assert_close(mine[key], theirs[key], rtol=0, atol=0)
            assert torch.equal(mine["labels"], mine["index"]) and torch.equal(mine["teachers/t/cam"][:, 0, 0].long(),
                                                                              mine["index"])
            mine["labels"] += 100  # a consumer that changes its batch in place changes no later epoch
    assert len(reads) == (3 + 1) * store.num_blocks  # the unheld stream: every epoch; the held one: the first only
    # workers are new processes every epoch: nothing to hold
    assert BlockStream(str(store.path), ["labels"], blocks, batch_size=5, workers=2).held is None


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
    assert stream.num_batches(0) == 1  # one window of 7 rows


TEACHER = {"arch": "toy", "source": "toy", "weights_sha256": "w", "target_layer": "f", "cam_path": "closed-form",
           "transform": {"mean": [0.5], "std": [0.5]}, "heldout_top1": 0.5, "map_shape": [2, 2], "code_sha256": "c"}


def make_aligned_store(path, invalid=(2, 9, 10, 11, 17)):
    """Every array of row r holds r (mod 256 for bytes), so any misalignment shows; `invalid` rows are unreadable."""
    store = make_store(path)
    r = np.arange(N)
    store.group["images"][...] = np.broadcast_to((r % 256).astype(np.uint8)[:, None, None, None], (N, 2, 2, 1))
    store.add_teacher("t", TEACHER)
    for block in range(store.num_blocks):
        start, stop = store.block_rows(block)
        rows = r[start:stop]
        valid = ~np.isin(rows, invalid)
        store.write_valid(block, valid)
        store.write_block("t", block, {
            "logits": np.repeat(rows[:, None], N, 1).astype(np.float16), "cam": np.repeat(rows, 4).reshape(-1, 2, 2).astype(np.uint8),
            "cam_max": rows.astype(np.float32), "cam_class": rows.astype(np.int16), "y_prob": rows / 100,
            "o_prob": rows / 200, "attention": np.zeros((len(rows), 2, 2), np.uint8), "attention_max": np.zeros(len(rows))})
    return store


def test_workers_keep_every_field_aligned_skip_invalid_rows_and_yield_exactly_the_planned_batches(tmp_path):
    invalid = (2, 9, 10, 11, 17)
    store = make_aligned_store(tmp_path / "s.zarr", invalid)
    TeacherStore.open(store.path).read_rows(0, 4, ["labels"])  # the parent has used zarr before forking workers
    fields = ["images", "labels", "teachers/t/logits", "teachers/t/cam", "teachers/t/cam_max", "teachers/t/y_prob"]
    stream = BlockStream(str(store.path), fields, list(range(store.num_blocks)), batch_size=3, seed=0, workers=2)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2, multiprocessing_context="forkserver")
    for epoch in range(3):
        stream.set_epoch(epoch)
        batches = list(loader)
        rows = []
        for batch in batches:
            index = batch["index"]
            rows += index.tolist()
            assert torch.equal(batch["labels"], index)
            assert torch.equal(batch["images"][:, 0, 0, 0].long(), index % 256)
            assert torch.equal(batch["teachers/t/logits"][:, 5].long(), index)
            assert torch.equal(batch["teachers/t/cam"][:, 1, 1].long(), index)
            assert torch.equal(batch["teachers/t/cam_max"].long(), index)
            torch.testing.assert_close(batch["teachers/t/y_prob"], index / 100)
        assert sorted(rows) == sorted(set(range(N)) - set(invalid))  # every readable row once
        # the plan, counted by hand: 6 blocks (rows 0-3, ..., 20-22; 3, 4, 1, 4, 3, 3 readable), two workers
        # with every other block of the epoch's order in windows of 2 blocks, each window ends in a partial batch
        order = np.random.default_rng([0, epoch]).permutation(6)
        readable = [3, 4, 1, 4, 3, 3]
        expected = sum(-(-(sum(readable[b] for b in order[w::2][i:i + 2])) // 3) for w in range(2) for i in (0, 2))
        assert len(batches) == expected == stream.num_batches(epoch)


def test_learning_rate_schedule_spans_exactly_the_batches_workers_yield(tmp_path):
    import math

    from pipeline.train import fit

    store = make_aligned_store(tmp_path / "s.zarr")
    stream = BlockStream(str(store.path), ["images", "labels"], list(range(store.num_blocks)), batch_size=3, seed=0,
                         workers=2)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2, multiprocessing_context="forkserver")
    seen = []

    def batches(epoch):
        stream.set_epoch(epoch)
        return loader

    def loss_fn(model, batch):
        seen.append(len(batch["labels"]))
        loss = model(batch["images"].float().flatten(1)).pow(2).mean()
        return {"loss": loss}

    model = torch.nn.Linear(4, 1)
    history = fit(model, batches, loss_fn, epochs=3, steps_per_epoch=stream.num_batches, lr=0.1, weight_decay=0.0,
                  desc="toy")
    total = len(seen)  # steps actually taken, counted independently of the plan
    assert total > 3 * (-(-(N - 5) // 3))  # more than the naive count: partial batches per window and worker
    # the last step ran at the cosine schedule's last non-zero value, none at lr 0
    assert history[-1]["lr"] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * (total - 1) / total)))
