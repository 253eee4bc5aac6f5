"""The teacher store: round trip, plain-zarr readability, refusal of the wrong store."""

import numpy as np
import pytest
import torch
import zarr

from pipeline.cache import TeacherStore, dequantize_cam, quantize_cam
from pipeline.errors import PipelineError

N, C, MAP = 10, 5, (3, 3)


def identity(num_samples=N, ids="abc"):
    return {"name": "toy", "split": "train", "num_samples": num_samples, "num_classes": C,
            "image_shape": [4, 4, 1], "ids_sha256": ids}


TEACHER = {"arch": "resnet8", "source": "checkpoint:x.pt", "weights_sha256": "w1", "target_layer": "features",
           "cam_path": "closed-form", "transform": {"mean": [0.5], "std": [0.25]}, "heldout_top1": 0.9,
           "map_shape": list(MAP)}


def block_arrays(rng, rows):
    return {"logits": rng.normal(size=(rows, C)).astype(np.float16),
            "cam": rng.integers(0, 256, size=(rows, *MAP), dtype=np.uint8),
            "cam_max": rng.random(rows).astype(np.float32),
            "y_prob": rng.random(rows).astype(np.float32),
            "o_prob": rng.random(rows).astype(np.float32),
            "attention": rng.integers(0, 256, size=(rows, *MAP), dtype=np.uint8),
            "attention_max": rng.random(rows).astype(np.float32)}


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
    assert group.attrs["format"] == "teacher-cache" and group.attrs["version"] == 2
    np.testing.assert_array_equal(group["labels"][:], np.arange(N) % C)
    assert group["images"].shape == (N, 4, 4, 1)
    assert group["teachers/t1/cam"].shards == (4, *MAP) and group["teachers/t1/cam"].chunks == (2, *MAP)
    for field in ("logits", "cam", "cam_max", "y_prob", "o_prob", "attention", "attention_max"):
        expected = np.concatenate([written[b][field] for b in range(3)])
        np.testing.assert_array_equal(group[f"teachers/t1/{field}"][:], expected)
        assert group[f"teachers/t1/{field}"].dtype == expected.dtype
    assert group["teachers/t1"].attrs["map_shape"] == list(MAP)

    rows = TeacherStore.open(tmp_path / "s.zarr").read_rows(4, 8, ["labels", "teachers/t1/y_prob"])
    np.testing.assert_array_equal(rows["teachers/t1/y_prob"], written[1]["y_prob"])


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
    with pytest.raises(PipelineError, match="is not a teacher-cache v2 store \\(format='teacher-cache', version=99\\)"):
        TeacherStore.open(tmp_path / "s.zarr")
    with pytest.raises(PipelineError, match="no teacher store at"):
        TeacherStore.open(tmp_path / "missing.zarr")


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
