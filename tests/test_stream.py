"""Stage two's reader: whole blocks, every row once per epoch, reproducible, worker-safe."""

import numpy as np
import pytest
import torch

from pipeline.store.teacher_store import TeacherStore
from pipeline.stream import BlockStream

N = 23


def make_store(path):
    identity = {"name": "toy", "split": "train", "num_samples": N, "num_classes": N,
                "image_shape": [2, 2, 1], "ids_sha256": "x"}
    images = np.zeros((N, 2, 2, 1), dtype=np.uint8)
    store = TeacherStore.create(path, identity, np.arange(N), images, "label", block_size=4, chunks_per_block=2)
    for block in range(store.num_blocks):  # every view the whole image, as extraction writes a one-view store
        rows = np.arange(*store.block_rows(block))
        store.write_samples(block, {"valid": np.ones(len(rows), bool), "view_boxes": np.tile([0, 0, 2, 2], (len(rows), 1, 1)),
                                    "view_flips": np.zeros((len(rows), 1), bool)})
    return store


def epoch_rows(stream):
    return [batch["labels"].tolist() for batch in stream]


def test_every_row_once_per_epoch_reading_whole_blocks(tmp_path, monkeypatch):
    store = make_store(tmp_path / "s.zarr")
    stream = BlockStream(str(store.location), ["images", "labels"], list(range(store.num_blocks)), batch_size=5, seed=3)
    reads = []  # of the epoch (the constructor counts each block's valid rows)
    original = TeacherStore.read_rows
    monkeypatch.setattr(TeacherStore, "read_rows",
                        lambda self, start, stop, fields, view=0: reads.append((start, stop)) or original(self, start, stop, fields, view))
    batches = epoch_rows(stream)
    assert sorted(sum(batches, [])) == list(range(N))
    assert max(len(b) for b in batches) == 5
    assert sorted(reads) == [store.block_rows(b) for b in range(store.num_blocks)]  # whole shards only


def test_a_small_store_is_read_from_disk_once_in_one_process(tmp_path, monkeypatch):
    store = make_aligned_store(tmp_path / "s.zarr")
    blocks, fields = list(range(store.num_blocks)), ["images", "labels", "teachers/t/logits", "teachers/t/cam"]
    held = BlockStream(str(store.location), fields, blocks, batch_size=5, seed=3)
    unheld = BlockStream(str(store.location), fields, blocks, batch_size=5, seed=3, hold_bytes=0)
    reads = []
    original = TeacherStore.read_rows
    monkeypatch.setattr(TeacherStore, "read_rows",
                        lambda self, start, stop, fields, view=0: reads.append(start) or original(self, start, stop, fields, view))
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
    assert BlockStream(str(store.location), ["labels"], blocks, batch_size=5, workers=2).held is None


def test_order_depends_on_seed_and_epoch_only(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    stream = BlockStream(str(store.location), ["labels"], list(range(store.num_blocks)), batch_size=4, seed=1)
    first = epoch_rows(stream)
    assert epoch_rows(stream) == first
    stream.set_epoch(1)
    assert epoch_rows(stream) != first
    assert sorted(sum(epoch_rows(stream), [])) == list(range(N))


@pytest.mark.parametrize("rank,ranks", [(0, 1), (1, 2)])
def test_each_epochs_rows_come_in_the_order_the_seed_fixes(tmp_path, rank, ranks):
    """The order written out with numpy: the epoch's block permutation (seed, epoch), every `ranks`-th block
    from `rank` on, windows of 2 blocks, and each window's rows permuted by the (seed, epoch, worker 1) stream."""
    store = make_store(tmp_path / "s.zarr")  # 23 rows in 6 blocks of 4 (the last of 3); labels are row numbers
    stream = BlockStream(str(store.location), ["labels"], list(range(6)), batch_size=5, seed=11, rank=rank, ranks=ranks)
    for epoch in range(3):
        blocks = np.random.default_rng([11, epoch]).permutation(6)[rank::ranks]
        shuffle = np.random.default_rng([11, epoch, 1])
        expected = []
        for first in range(0, len(blocks), 2):
            rows = np.concatenate([np.arange(4 * b, min(4 * b + 4, N)) for b in blocks[first:first + 2]])
            expected += rows[shuffle.permutation(len(rows))].tolist()
        stream.set_epoch(epoch)
        batches = epoch_rows(stream)
        assert sum(batches, []) == expected
        assert [len(b) for b in batches] == [n for first in range(0, len(blocks), 2)  # each window's own batches
                                             for size in [sum(min(4, N - 4 * b) for b in blocks[first:first + 2])]
                                             for n in [5] * (size // 5) + [size % 5] * bool(size % 5)]


def test_only_the_given_blocks_are_read(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    stream = BlockStream(str(store.location), ["labels"], [0, 5], batch_size=8, seed=0)
    assert sorted(sum(epoch_rows(stream), [])) == [0, 1, 2, 3, 20, 21, 22]
    assert stream.num_batches(0) == 1  # one window of 7 rows


TEACHER = {"arch": "toy", "source": "toy", "weights_sha256": "w", "target_layer": "f", "cam_path": "closed-form",
           "transform": {"mean": [0.5], "std": [0.5]}, "heldout": {"split": "val", "samples": 10, "top1": 0.5, "mean_drop": 0.3}, "map_shape": [2, 2]}


def make_aligned_store(path, invalid=(2, 9, 10, 11, 17)):
    """Every array of row r holds r (mod 256 for bytes), so any misalignment shows; `invalid` rows are unreadable."""
    store = make_store(path)
    r = np.arange(N)
    store.group["images"][...] = np.broadcast_to((r % 256).astype(np.uint8)[:, None, None, None], (N, 2, 2, 1))
    for block in range(store.num_blocks):
        store.digests.bind(None, block, ["images"])  # rewritten here: bound to their place anew, as a writer does
    store.add_teacher("t", TEACHER)
    for block in range(store.num_blocks):
        start, stop = store.block_rows(block)
        rows = r[start:stop]
        valid = ~np.isin(rows, invalid)
        store.write_samples(block, {"valid": valid, "view_boxes": np.tile([0, 0, 2, 2], (len(rows), 1, 1)),
                                    "view_flips": np.zeros((len(rows), 1), bool)})
        store.write_block("t", block, {key: value[:, None] for key, value in {
            "logits": np.repeat(rows[:, None], N, 1).astype(np.float16), "cam": np.repeat(rows, 4).reshape(-1, 2, 2).astype(np.uint8),
            "cam_max": rows.astype(np.float32), "cam_class": rows.astype(np.int16), "y_prob": rows / 100,
            "o_prob": rows / 200, "attention": np.zeros((len(rows), 2, 2), np.uint8), "attention_max": np.zeros(len(rows))}.items()})
    return store


def test_workers_keep_every_field_aligned_skip_invalid_rows_and_yield_exactly_the_planned_batches(tmp_path):
    invalid = (2, 9, 10, 11, 17)
    store = make_aligned_store(tmp_path / "s.zarr", invalid)
    TeacherStore.open(store.location).read_rows(0, 4, ["labels"])  # the parent has used zarr before forking workers
    fields = ["images", "labels", "teachers/t/logits", "teachers/t/cam", "teachers/t/cam_max", "teachers/t/y_prob"]
    stream = BlockStream(str(store.location), fields, list(range(store.num_blocks)), batch_size=3, seed=0, workers=2)
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

    from pipeline.objective import Term
    from pipeline.train import fit

    store = make_aligned_store(tmp_path / "s.zarr")
    stream = BlockStream(str(store.location), ["images", "labels"], list(range(store.num_blocks)), batch_size=3, seed=0,
                         workers=2)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2, multiprocessing_context="forkserver")
    seen = []

    def batches(epoch):
        stream.set_epoch(epoch)
        return loader

    def loss_fn(model, batch):
        seen.append(len(batch["labels"]))
        return {"loss": Term.over(model(batch["images"].float().flatten(1)).pow(2)[:, 0])}

    model = torch.nn.Linear(4, 1)
    history = fit(model, batches, loss_fn, epochs=3, steps_per_epoch=stream.num_batches, lr=0.1, weight_decay=0.0,
                  desc="toy")
    total = len(seen)  # steps actually taken, counted independently of the plan
    assert total > 3 * (-(-(N - 5) // 3))  # more than the naive count: partial batches per window and worker
    # the last step ran at the cosine schedule's last non-zero value, none at lr 0
    assert history[-1]["lr"] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * (total - 1) / total)))


def test_each_epoch_reads_one_view_per_block_cycling_and_renders_its_box(tmp_path):
    """Three views: view v of row r has logits 100 v + r and a box shifted right by v + r % 2 pixels,
    flipped for v = 2 xor r % 3 = 0; the student's image must be that row's box of its stored image,
    and its values that view's."""
    from pipeline.views import ViewPolicy

    identity = {"name": "toy", "split": "train", "num_samples": N, "num_classes": 1, "image_shape": [3, 4, 1],
                "ids_sha256": "x"}
    images = (np.arange(N)[:, None, None, None] * 12 + np.arange(12).reshape(1, 3, 4, 1)).astype(np.uint8)
    store = TeacherStore.create(tmp_path / "s.zarr", identity, np.zeros(N), images, "label", block_size=4,
                                chunks_per_block=2, views=ViewPolicy(count=3, shift=1))
    store.add_teacher("t", {**TEACHER, "map_shape": [1, 1]})
    for block in range(store.num_blocks):
        start, stop = store.block_rows(block)
        r = np.arange(start, stop)
        shift = np.arange(3)[None, :] + (r % 2)[:, None]  # x0, y0, x1, y1: v + r % 2 pixels right
        boxes = np.stack([shift, 0 * shift, shift + 4, 0 * shift + 3], 2).astype(np.int32)
        flips = (np.arange(3)[None, :] == 2) ^ (r % 3 == 0)[:, None]
        store.write_samples(block, {"valid": np.ones(len(r), bool), "view_boxes": boxes, "view_flips": flips})
        per_view = lambda f: np.stack([f(v) for v in range(3)], 1)  # noqa: E731
        zeros = np.zeros((len(r), 3, 1, 1), np.uint8)
        store.write_block("t", block, {"logits": per_view(lambda v: (100 * v + r)[:, None]).astype(np.float16),
                                       "cam": zeros, "cam_max": per_view(lambda v: r * 0.0 + v), "cam_class": per_view(lambda v: r * 0),
                                       "y_prob": per_view(lambda v: r / 100), "o_prob": per_view(lambda v: r / 100),
                                       "attention": zeros, "attention_max": per_view(lambda v: r * 0.0)})
    blocks = list(range(store.num_blocks))
    stream = BlockStream(str(store.location), ["images", "labels", "teachers/t/logits"], blocks, batch_size=5, seed=7)
    used = {b: [] for b in blocks}
    for epoch in range(6):
        stream.set_epoch(epoch)
        for batch in stream:
            for row, image, logit in zip(batch["index"].tolist(), batch["images"], batch["teachers/t/logits"]):
                view = int(logit[0]) // 100
                assert int(logit[0]) == 100 * view + row
                # block b's views in a seeded order (seed, b), cycled: one view per epoch, each once in 3 epochs
                assert view == np.random.default_rng([7, row // 4, 0x71E35]).permutation(3)[epoch % 3]
                used[row // 4].append((epoch, view)) if row % 4 == 0 else None
                source = np.pad(images[row, :, :, 0], ((0, 0), (0, 3)))  # black right of the image
                right = view + row % 2
                expected = source[:, right:right + 4][:, ::-1 if (view == 2) != (row % 3 == 0) else 1]
                np.testing.assert_array_equal(image[:, :, 0].numpy(), expected, err_msg=f"row {row} view {view}")
    for block, seen in used.items():  # each view once in every 3 epochs, in an order of the block's own
        assert sorted(v for _, v in seen[:3]) == [0, 1, 2] and [v for _, v in seen[3:]] == [v for _, v in seen[:3]]
    assert len({tuple(v for _, v in seen[:3]) for seen in used.values()}) > 1
    eval_only = BlockStream(str(store.location), ["teachers/t/logits"], blocks, batch_size=5, seed=7, eval_view=True)
    eval_only.set_epoch(4)
    assert all((batch["teachers/t/logits"][:, 0] < 100).all() for batch in eval_only)


def test_reading_ahead_by_threads_yields_the_batches_of_reading_in_turn(tmp_path):
    store = make_aligned_store(tmp_path / "s.zarr")
    blocks, fields = list(range(store.num_blocks)), ["images", "labels", "teachers/t/logits", "teachers/t/cam"]
    in_turn = BlockStream(str(store.location), fields, blocks, batch_size=5, seed=3, hold_bytes=0, prefetch=0)
    ahead = BlockStream(str(store.location), fields, blocks, batch_size=5, seed=3, hold_bytes=0, prefetch=2)
    for epoch in range(2):
        in_turn.set_epoch(epoch)
        ahead.set_epoch(epoch)
        for mine, theirs in zip(ahead, in_turn, strict=True):
            assert mine.keys() == theirs.keys()
            assert all(torch.equal(mine[key], theirs[key]) for key in mine)
