"""The teacher store: round trip, plain-zarr readability, refusal of the wrong store."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
import zarr

from pipeline.errors import PipelineError
from pipeline.store.codec import dequantize_cam, full_logits, quantize_cam, topk_logit_fields
from pipeline.store.layout import digest_array, is_viewed
from pipeline.store.teacher_store import TeacherStore, default_block_size
from pipeline.views import ViewPolicy

N, C, MAP = 10, 5, (3, 3)


def identity(num_samples=N, ids="abc"):
    return {"name": "toy", "split": "train", "num_samples": num_samples, "num_classes": C,
            "image_shape": [4, 4, 1], "ids_sha256": ids}


TEACHER = {"arch": "resnet8", "source": "checkpoint:x.pt", "weights_sha256": "w1", "target_layer": "features",
           "cam_path": "closed-form", "transform": {"mean": [0.5], "std": [0.25]}, "heldout": {"split": "val", "samples": 10, "top1": 0.9, "mean_drop": 0.3},
           "map_shape": list(MAP)}


def block_arrays(rng, rows, views=1):
    n = (rows, views)
    return {"logits": rng.normal(size=(*n, C)).astype(np.float16),
            "cam": rng.integers(0, 256, size=(*n, *MAP), dtype=np.uint8),
            "cam_max": rng.random(n).astype(np.float32),
            "cam_class": rng.integers(0, C, size=n).astype(np.int16),
            "y_prob": rng.random(n).astype(np.float32),
            "o_prob": rng.random(n).astype(np.float32),
            "attention": rng.integers(0, 256, size=(*n, *MAP), dtype=np.uint8),
            "attention_max": rng.random(n).astype(np.float32)}


def make_store(path, block_size=4):
    labels = np.arange(N) % C
    images = np.arange(N * 16, dtype=np.uint8).reshape(N, 4, 4, 1)
    return TeacherStore.create(path, identity(), labels, images, target="label", block_size=block_size,
                               chunks_per_block=2)


def test_round_trip_and_plain_zarr(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    store.add_teacher("t1", TEACHER)
    assert store.num_blocks == 3 and store.block_rows(2) == (8, 10)
    rng = np.random.default_rng(0)
    written = {}
    for block in store.pending_blocks("t1"):
        start, stop = store.block_rows(block)
        written[block] = block_arrays(rng, stop - start)
        store.write_block("t1", block, written[block])
    assert store.pending_blocks("t1") == []

    group = zarr.open_group(tmp_path / "s.zarr", mode="r")  # plain zarr, no project code
    assert group.attrs["format"] == "teacher-store" and group.attrs["version"] == 8
    np.testing.assert_array_equal(group["labels"][:], np.arange(N) % C)
    assert group["images"].shape == (N, 4, 4, 1)
    assert group["teachers/t1/cam"].shards == (4, 1, *MAP) and group["teachers/t1/cam"].chunks == (2, 1, *MAP)
    for field in ("logits", "cam", "cam_max", "cam_class", "y_prob", "o_prob", "attention", "attention_max"):
        expected = np.concatenate([written[b][field] for b in range(3)])
        np.testing.assert_array_equal(group[f"teachers/t1/{field}"][:], expected)
        assert group[f"teachers/t1/{field}"].dtype == expected.dtype
    assert group["teachers/t1"].attrs["map_shape"] == list(MAP)

    rows = TeacherStore.open(tmp_path / "s.zarr").read_rows(4, 8, ["labels", "teachers/t1/y_prob"])
    np.testing.assert_array_equal(rows["teachers/t1/y_prob"], written[1]["y_prob"][:, 0])


def written_store(path, block_size=4, logits=None, n=N, chunks_per_block=2, views=1):
    store = TeacherStore.create(path, identity(num_samples=n), np.arange(n) % C,
                                np.arange(n * 16, dtype=np.uint8).reshape(n, 4, 4, 1), target="label",
                                block_size=block_size, chunks_per_block=chunks_per_block, logits=logits,
                                views=ViewPolicy(count=views, shift=1))
    store.add_teacher("t1", TEACHER)
    rng = np.random.default_rng(1)
    for block in range(store.num_blocks):
        start, stop = store.block_rows(block)
        store.write_samples(block, {"valid": rng.random(stop - start) < 0.8,
                                    "view_boxes": rng.integers(-9, 9, (stop - start, views, 4)).astype(np.int32),
                                    "view_flips": rng.random((stop - start, views)) < 0.5})
        arrays = block_arrays(rng, stop - start, views)
        if logits:
            fields = topk_logit_fields(torch.from_numpy(arrays["logits"]).float().flatten(0, 1), logits["k"])
            arrays |= {key: value.reshape(stop - start, views, *value.shape[1:]) for key, value in fields.items()}
        store.write_block("t1", block, arrays)
    return store


@pytest.mark.parametrize("logits,n,block_size,chunks_per_block,views", [
    (None, N, 4, 2, 1), ({"mode": "topk", "k": 2}, N, 4, 2, 1),
    (None, 9, 8, 4, 1),  # the last chunk (rows 8-9) reaches past the array's end; 4 chunks per block as by default
    ({"mode": "topk", "k": 2}, 9, 4, 2, 3),  # three views, each its own shard file
])
def test_direct_shard_reads_equal_zarrs_for_every_row_range(tmp_path, logits, n, block_size, chunks_per_block, views):
    """The reader decodes shard files itself (pipeline.store.shards); zarr's own read path is the reference."""
    store = written_store(tmp_path / "s.zarr", block_size, logits, n, chunks_per_block, views)
    group = zarr.open_group(tmp_path / "s.zarr", mode="r")
    arrays = [*store.shared_arrays, *(f"teachers/t1/{f}" for f in store.teacher_fields)]
    zarrs = {array: (group[array].dtype, group[array][...]) for array in arrays}  # each decoded by zarr, read once
    for view in range(views):
        for start in range(n):
            for stop in range(start + 1, n + 1):  # within a chunk, across chunks and blocks, the partial last block
                rows = store.read_rows(start, stop, arrays, view)
                for array in arrays:
                    dtype, values = zarrs[array]
                    expected = values[start:stop, view] if is_viewed(array) else values[start:stop]
                    assert rows[array].dtype == dtype
                    np.testing.assert_array_equal(rows[array], expected, err_msg=f"{array} {start}:{stop} view {view}")
    assert len(list((tmp_path / "s.zarr" / "teachers" / "t1" / "cam").rglob("c/0/*/0/0"))) == views
    with pytest.raises(ValueError, match=f"view {views} asked of store .* which has {views} view"):
        store.read_rows(0, 1, arrays, views)


def edit_metadata(path, edit):
    metadata = json.loads(path.read_text())
    edit(metadata)
    path.write_text(json.dumps(metadata))


@pytest.mark.parametrize("edit,message", [
    (lambda m: m["chunk_grid"]["configuration"].update(chunk_shape=[8, 1]),  # shards of 8 rows, blocks of 4
     "y_prob: its zarr.json describes 10 rows in shards of 8, chunks of 2 and 1 views, not 10, 4, 2 and 1"),
    (lambda m: m.update(shape=[10, 2]),  # two views in a store of one
     "y_prob: its zarr.json describes 10 rows in shards of 4, chunks of 2 and 2 views, not 10, 4, 2 and 1"),
    (lambda m: m["codecs"][0]["configuration"]["codecs"][0].update(configuration={"endian": "big"}),
     "array teachers/t1/y_prob is not laid out as a teacher-store v8 array"),
    (lambda m: m.pop("data_type"), "array teachers/t1/y_prob is not laid out as a teacher-store v8 array"),
])
def test_an_array_laid_out_otherwise_than_the_store_is_refused_not_misread(tmp_path, edit, message):
    """Rows are placed by the store's block size: an array whose shards differ would be read at wrong offsets."""
    written_store(tmp_path / "s.zarr")
    edit_metadata(tmp_path / "s.zarr" / "teachers" / "t1" / "y_prob" / "zarr.json", edit)
    with pytest.raises(PipelineError, match=re.escape(message)):
        TeacherStore.open(tmp_path / "s.zarr").read_rows(0, 4, ["teachers/t1/y_prob"])


def test_a_chunk_whose_header_states_another_size_is_damage_even_with_a_valid_checksum(tmp_path):
    """A decoder writing fewer bytes than a chunk holds would leave rows of uninitialised memory."""
    import google_crc32c

    store = written_store(tmp_path / "s.zarr")
    path = store.location / store.shard_key("teachers/t1/y_prob", 1)
    data = bytearray(path.read_bytes())
    index = np.frombuffer(bytes(data[-36:-4]), "<u8").reshape(2, 2)  # 2 chunks: (offset, length), then crc32c
    offset, length = (int(v) for v in index[0])
    data[offset + 4:offset + 8] = (4).to_bytes(4, "little")  # blosc header: decoded bytes, really 2 rows * 4 bytes
    data[offset + length - 4:offset + length] = google_crc32c.value(bytes(data[offset:offset + length - 4])).to_bytes(
        4, "little")
    path.write_bytes(bytes(data))
    store.digests.bind("t1", 1)  # as if a writer had written this file there (else its binding digest fails first)
    with pytest.raises(PipelineError, match="y_prob block 1: it does not decode .a chunk says it holds 4 bytes"):
        TeacherStore.open(tmp_path / "s.zarr").read_rows(4, 8, ["teachers/t1/y_prob"])


def test_a_shard_left_from_another_teacher_or_an_earlier_extraction_is_refused(tmp_path):
    """A shard file bound to its place by array, block, view and its writer's fingerprint, and by its bytes: one
    written by another teacher of the same name, or at the same place by an earlier extraction, is refused."""
    store = written_store(tmp_path / "s.zarr")
    path = store.location / store.shard_key("teachers/t1/cam", 1)
    other = TeacherStore.create(tmp_path / "other.zarr", identity(), np.arange(N) % C,
                                np.arange(N * 16, dtype=np.uint8).reshape(N, 4, 4, 1), target="label", block_size=4,
                                chunks_per_block=2, views=ViewPolicy(count=1, shift=1))
    other.add_teacher("t1", {**TEACHER, "weights_sha256": "other weights"})
    rng = np.random.default_rng(1)  # the same values as written_store's block 0 and 1 ...
    for block in (0, 1):
        start, stop = other.block_rows(block)
        other.write_samples(block, {"valid": rng.random(stop - start) < 0.8,
                                    "view_boxes": rng.integers(-9, 9, (stop - start, 1, 4)).astype(np.int32),
                                    "view_flips": rng.random((stop - start, 1)) < 0.5})
        other.write_block("t1", block, block_arrays(rng, stop - start, 1))
    foreign = other.location / other.shard_key("teachers/t1/cam", 1)
    assert foreign.read_bytes() == path.read_bytes()  # ... so the files are byte for byte the same
    original = path.read_bytes()
    store.writable("teachers/t1/cam")[4:8] = 255 - store.read_rows(4, 8, ["teachers/t1/cam"])["teachers/t1/cam"][:, None]
    with pytest.raises(PipelineError, match="teachers/t1/cam block 1: its shard file is not the one written there"):
        store.read_rows(4, 8, ["teachers/t1/cam"])  # rewritten after its digest was recorded: other bytes
    path.write_bytes(original)
    assert store.read_rows(4, 8, ["teachers/t1/cam"])  # the file written there, back
    other_binding = other.digests.recorded("t1", 1)
    assert (other_binding != store.digests.recorded("t1", 1)).any()  # another writer: other digests
    store.writable(digest_array("t1"))[1] = other_binding  # the other teacher's record, with the same bytes
    with pytest.raises(PipelineError, match="teachers/t1/cam block 1: its shard file is not the one written there"):
        store.read_rows(4, 8, ["teachers/t1/cam"])


def test_a_teacher_folder_of_another_store_is_refused(tmp_path):
    """Two stores of the same rows and teacher, made with other targets: a teacher's files belong to their
    store, so its folder copied into the other store fails its reads instead of passing as that store's."""
    stores = {}
    for target in ("label", "predicted"):
        store = TeacherStore.create(tmp_path / f"{target}.zarr", identity(), np.arange(N) % C, None, target=target,
                                    block_size=4, chunks_per_block=2)
        store.add_teacher("t1", TEACHER)
        rng = np.random.default_rng(0 if target == "label" else 1)
        for block in range(store.num_blocks):
            start, stop = store.block_rows(block)
            store.write_samples(block, {"valid": np.ones(stop - start, bool),
                                        "view_boxes": np.tile([0, 0, 4, 4], (stop - start, 1, 1)),
                                        "view_flips": np.zeros((stop - start, 1), bool)})
            store.write_block("t1", block, block_arrays(rng, stop - start))
        stores[target] = store
    shutil.rmtree(tmp_path / "label.zarr" / "teachers" / "t1")
    shutil.copytree(tmp_path / "predicted.zarr" / "teachers" / "t1", tmp_path / "label.zarr" / "teachers" / "t1")
    with pytest.raises(PipelineError, match="teachers/t1/logits block 0: its shard file is not the one written there"):
        TeacherStore.open(tmp_path / "label.zarr").read_rows(0, 4, ["teachers/t1/logits"])


def test_unfinished_blocks_are_pending(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    store.add_teacher("t1", TEACHER)
    store.write_block("t1", 1, block_arrays(np.random.default_rng(0), 4))
    assert store.pending_blocks("t1") == [0, 2]
    assert store.finished_blocks(["t1"]) == [1]


def test_reopening_with_other_data_is_refused(tmp_path):
    make_store(tmp_path / "s.zarr")
    with pytest.raises(PipelineError, match="made from dataset.ids_sha256='abc', not 'xyz'"):
        TeacherStore.create(tmp_path / "s.zarr", identity(ids="xyz"), np.zeros(N), None, "label", 4)
    with pytest.raises(PipelineError, match="has target='label', not 'predicted'"):
        TeacherStore.create(tmp_path / "s.zarr", identity(), np.zeros(N), None, "predicted", 4)


def test_a_different_teacher_under_the_same_name_is_refused(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    store.add_teacher("t1", TEACHER)
    store.add_teacher("t1", {**TEACHER, "source": "checkpoint:moved.pt"})  # same weights: fine
    with pytest.raises(PipelineError, match="different teacher 't1' \\(differs in: weights_sha256\\)"):
        store.add_teacher("t1", {**TEACHER, "weights_sha256": "w2"})


def test_unknown_format_or_version_is_refused(tmp_path):
    make_store(tmp_path / "s.zarr")
    group = zarr.open_group(tmp_path / "s.zarr", mode="r+")
    group.attrs["version"] = 99
    with pytest.raises(PipelineError, match="is not a teacher-store v8 store \\(format='teacher-store', version=99\\)"):
        TeacherStore.open(tmp_path / "s.zarr")
    with pytest.raises(PipelineError, match="no teacher store at"):
        TeacherStore.open(tmp_path / "missing.zarr")



@pytest.mark.parametrize("format_name", ["teacher-cache", "teacher-store"])
def test_a_store_of_an_earlier_version_is_refused_and_replaced_only_on_request(tmp_path, format_name):
    make_store(tmp_path / "s.zarr")
    zarr.open_group(tmp_path / "s.zarr", mode="r+").attrs.update({"format": format_name, "version": 7})
    with pytest.raises(PipelineError, match=f"is not a teacher-store v8 store \\(format='{format_name}', version=7\\)"):
        make_store(tmp_path / "s.zarr")
    labels, images = np.arange(N) % C, np.zeros((N, 4, 4, 1), np.uint8)
    store = TeacherStore.create(tmp_path / "s.zarr", identity(), labels, images, target="label", block_size=4,
                                chunks_per_block=2, replace=True)
    assert (store.attrs["format"], store.attrs["version"], store.teachers) == ("teacher-store", 8, [])


def test_a_store_made_by_another_extraction_version_is_stale(tmp_path, monkeypatch):
    make_store(tmp_path / "s.zarr")
    monkeypatch.setattr("pipeline.store.teacher_store.EXTRACTION_VERSION", 2)
    with pytest.raises(PipelineError, match="has extraction_version=1, not 2; use a new --store path"):
        make_store(tmp_path / "s.zarr")


def test_readers_refuse_a_store_of_another_extraction_version(tmp_path, monkeypatch):
    """A student renders its own views of image files: values extracted by other code must not meet them."""
    from pipeline.store.info import verify

    store = make_store(tmp_path / "s.zarr")
    store.check_holds(identity())  # made by this code's extraction version
    monkeypatch.setattr("pipeline.store.teacher_store.EXTRACTION_VERSION", 2)
    monkeypatch.setattr("pipeline.store.info.EXTRACTION_VERSION", 2)
    with pytest.raises(PipelineError, match="has extraction_version=1, not 2; use a new --store path, or rebuild it"):
        store.check_holds(identity())
    assert "made by extraction version 1, this code's is 2: stale" in " ".join(verify(store, [], quick=True))

def test_unknown_teacher_lists_the_stored_ones(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    store.add_teacher("t1", TEACHER)
    with pytest.raises(PipelineError, match="has no teacher 'nope'; it holds: t1"):
        store.teacher_group("nope")


def test_quantized_maps_keep_their_shape_and_empty_maps_stay_zero():
    cam = torch.tensor([[[0.0, 0.5], [1.0, 2.0]], [[0.0, 0.0], [0.0, 0.0]]])
    u8, scale = quantize_cam(cam)
    np.testing.assert_array_equal(u8[0], [[0, 64], [128, 255]])
    np.testing.assert_array_equal(u8[1], 0)
    np.testing.assert_array_equal(scale, [2.0, 0.0])
    restored = dequantize_cam(u8, scale)
    assert torch.isfinite(restored).all()
    torch.testing.assert_close(restored[0], cam[0], atol=2.0 / 255, rtol=0)
    assert torch.equal(restored[1], torch.zeros(2, 2))


def realistic_logits(rows: int = 64, classes: int = 1000, seed: int = 0) -> torch.Tensor:
    """ImageNet-like teacher logits: every row a N(0, 1.5) tail; the first half confident (one class at
    18-30, as a trained teacher on its own train split), the second half unsure (five classes at 4-7)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, classes, generator=g) * 1.5
    half = rows // 2
    top = torch.randint(0, classes, (rows, 5), generator=g)
    logits[torch.arange(half), top[:half, 0]] = 18 + 12 * torch.rand(half, generator=g)
    logits[torch.arange(half, rows)[:, None], top[half:]] = 4 + 3 * torch.rand(rows - half, 5, generator=g)
    return logits


def test_topk_logits_restore_the_distribution_within_a_bound():
    logits = realistic_logits()
    k, classes = 10, logits.shape[1]
    rows = {f"teachers/t/{key}": value for key, value in topk_logit_fields(logits, k).items()}
    restored = full_logits(rows, "t", classes)
    # reference, in float64 and without the store: the true top-k probabilities and tail mass
    true = torch.softmax(logits.double(), 1)
    kept = torch.zeros_like(true, dtype=torch.bool).scatter(1, logits.topk(k, 1).indices, True)
    got = torch.softmax(restored.double(), 1)
    # the top K keep their probabilities up to float16 rounding of the logits (relative 2^-11 of values < 32)
    torch.testing.assert_close(got[kept], true[kept], rtol=0.02, atol=1e-12)
    tail_true, tail_got = true[~kept].view(len(true), -1).sum(1), got[~kept].view(len(true), -1).sum(1)
    assert (tail_got / tail_true - 1).abs().max() < 0.02  # the tail's mass too, on confident rows (~1e-8)
    assert tail_true[:32].max() < 1e-3  # the first half are confident rows indeed
    kl = {}
    for temperature in (1.0, 4.0):
        p, q = torch.log_softmax(logits.double() / temperature, 1), torch.log_softmax(restored.double() / temperature, 1)
        kl[temperature] = (p.exp() * (p - q)).sum(1)
    # at T = 1 the only error the format must make: the tail's shape is lost, its mass spread evenly,
    # which costs tail mass * KL(tail || uniform); confident rows have almost no tail
    tail = true[~kept].view(len(true), -1) / tail_true[:, None]
    floor = tail_true * (tail * (tail * tail.shape[1]).log()).sum(1)
    assert (kl[1.0] - floor).max() < 1e-3
    assert kl[1.0][:32].max() < 1e-3
    assert kl[4.0].max() < 0.12  # was 1.8 nats when the tail mass was taken as 1 - sum of the top K
    assert torch.equal(full_logits({"teachers/t/logits": logits}, "t", classes), logits)  # full mode: as stored


@pytest.mark.parametrize("samples,expected", [
    (1_437, 256),  # digits' training split: 5 blocks of the smallest size
    (50_000, 1_024),  # CIFAR: 48 blocks (4096 would give 12)
    (200_000, 4_096),  # 48 blocks (16384 would give 12)
    (1_281_167, 16_384),  # ILSVRC2012's training split: 78 blocks
])
def test_default_block_size_is_the_largest_that_leaves_32_blocks(samples, expected):
    assert default_block_size(samples) == expected


def test_verify_refuses_view_arrays_of_another_dtype(tmp_path):
    """view_flips read as uint8 would still decode (one byte a value): verify names the wrong dtype."""
    from pipeline.store.info import verify

    written_store(tmp_path / "s.zarr", views=2)
    edit_metadata(tmp_path / "s.zarr" / "view_flips" / "zarr.json", lambda m: m.update(data_type="uint8"))
    problems = verify(TeacherStore.open(tmp_path / "s.zarr"), [])
    assert "view_flips: uint8 (10, 2), expected bool (10, 2)" in problems
