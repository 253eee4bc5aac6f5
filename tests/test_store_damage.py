"""A store that notices damage: every kind of broken shard file is found, reported one line per
block, refused by stage two, and repaired by recomputing only the broken blocks."""

import shutil

import numpy as np
import pytest
import zarr

from conftest import assert_same_store, extract_args, invoke

BLOCK_ROWS, CHUNK_ROWS = 44, 11  # the test store: digits' test split, 9 blocks of 44 rows, 4 chunks a shard, 2 views


def two_view_args(teachers, store):
    return extract_args(teachers, store, "--split", "test", "--views", 2, block_size=BLOCK_ROWS)


@pytest.fixture(scope="module")
def clean_store(teachers, tmp_path_factory):
    store = tmp_path_factory.mktemp("clean") / "store.zarr"
    invoke(*two_view_args(teachers, store))
    return store


VIEWED = ("view_boxes", "view_flips", "teachers/vgg8_bn/y_prob", "teachers/vgg8_bn/logits", "teachers/resnet8_slim/cam",
          "teachers/vgg8_bn/cam", "teachers/resnet8_slim/y_prob")


def shard(store, array, block):
    """The shard file of `block` (of view 1, for arrays with a view axis)."""
    trailing = {"labels": "", "valid": "", "images": "/0/0/0", "view_boxes": "/1/0", "view_flips": "/1",
                "teachers/vgg8_bn/y_prob": "/1", "teachers/vgg8_bn/logits": "/1/0",
                "teachers/resnet8_slim/cam": "/1/0/0", "teachers/vgg8_bn/cam": "/1/0/0",
                "teachers/resnet8_slim/y_prob": "/1", "shard_digests": "/0/0",
                "teachers/vgg8_bn/shard_digests": "/0/0"}[array]
    return store / array / "c" / f"{block}{trailing}"


def said(array, what):
    return f"{what} (view 1)" if array in VIEWED else what


def first_chunk(path):
    """(offset, length) of the shard's first chunk, read from its index (16 bytes per chunk + crc32c) by hand."""
    index = path.read_bytes()[-(16 * (BLOCK_ROWS // CHUNK_ROWS) + 4):]
    return int.from_bytes(index[0:8], "little"), int.from_bytes(index[8:16], "little")


def flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def flip_chunk_data(path):
    offset, length = first_chunk(path)
    flip(path, offset + length // 2)


def flip_index(path):
    flip(path, path.stat().st_size - 12)  # inside the last chunk's index entry


def truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def make_empty(path):
    path.write_bytes(b"")


# how the file is broken -> what verify and a reader say (a truncated file's last bytes are no index;
# zarr alone would read an empty file as fill values)
DAMAGE = {
    "flipped byte in chunk data": (flip_chunk_data, "it does not decode (checksum mismatch)"),
    "flipped byte in shard index": (flip_index, "its shard index fails its checksum (truncated or damaged)"),
    "deleted shard": (lambda path: path.unlink(), "its shard file is missing"),
    "truncated shard": (truncate, "its shard index fails its checksum (truncated or damaged)"),
    "zero-length file": (make_empty, "its shard file is empty"),
}
CASES = [  # every kind of damage, and every array kind (shared, teacher; 1-, 2-, 3-, 4-d) at least once
    ("flipped byte in chunk data", "teachers/vgg8_bn/logits"), ("flipped byte in chunk data", "labels"),
    ("flipped byte in shard index", "teachers/resnet8_slim/cam"), ("deleted shard", "valid"),
    ("deleted shard", "images"), ("truncated shard", "teachers/vgg8_bn/y_prob"),
    ("zero-length file", "teachers/vgg8_bn/logits"), ("flipped byte in chunk data", "view_boxes"),
    ("deleted shard", "view_flips"),
    ("truncated shard", "shard_digests"), ("deleted shard", "teachers/vgg8_bn/shard_digests"),  # the digest records
]


@pytest.mark.parametrize("kind,array", CASES)
def test_every_kind_of_damage_is_found_and_repaired_by_recomputing_only_its_block(
        kind, array, teachers, clean_store, tmp_path):
    damage, what = DAMAGE[kind]
    store = tmp_path / "store.zarr"
    shutil.copytree(clean_store, store)
    damage(shard(store, array, 5))

    result = invoke("store", "verify", store, exit_code=1)
    assert f"FAIL damaged: {array} block 5: {said(array, what)}\n" in result.output
    assert result.output.count("FAIL damaged:") == 1
    if kind != "flipped byte in chunk data":  # the quick check reads indexes only, not chunk data
        result = invoke("store", "verify", "--quick", store, exit_code=1)
        assert f"FAIL damaged: {array} block 5: {said(array, what)}\n" in result.output

    result = invoke("store", "verify", "--repair", store, exit_code=1)
    assert "repaired" in result.output and not shard(store, array, 5).exists()
    result = invoke(*two_view_args(teachers, store))
    recomputed = 0 if array in ("labels", "images") else 1  # shared rows come from the data set, teachers' blocks
    assert f": {recomputed} of 9 blocks to extract" in result.output  # are recomputed only where they broke
    assert "OK" in invoke("store", "verify", store).output
    assert_same_store(store, clean_store)


@pytest.mark.parametrize("kind,array,workers", [
    *((kind, "teachers/vgg8_bn/logits", 0) for kind in DAMAGE),
    ("flipped byte in chunk data", "teachers/vgg8_bn/logits", 2), ("zero-length file", "labels", 2),
    ("zero-length file", "valid", 0), ("zero-length file", "shard_digests", 0),
])
def test_a_student_stops_on_damage_with_one_line_naming_it_and_the_repair(kind, array, workers, clean_store, tmp_path):
    store = tmp_path / "store.zarr"
    shutil.copytree(clean_store, store)
    DAMAGE[kind][0](shard(store, array, 3))
    result = invoke("train-student", "--split", "test", "--store", store, "--method", "kd-avg", "--epochs", 2,
                    "--num-workers", workers, "--out-dir", tmp_path / "s",
                    exit_code=1)  # two epochs read both views of every block
    assert (f"Error: store {store} is damaged: {array} block 3: {said(array, DAMAGE[kind][1])}; run `pipeline store "
            f"verify --repair {store}`, then the `pipeline extract-teachers` command that wrote it") \
        in result.output.splitlines()
    assert "Traceback" not in result.output and result.output.count("Error") == 1


MISPLACED = "its shard file is not the one written there (moved from another block, view or array, or left from an " \
    "earlier extraction)"


@pytest.mark.parametrize("first,second", [
    (("teachers/vgg8_bn/cam", 2), ("teachers/vgg8_bn/cam", 5)),  # two blocks of one array
    (("teachers/vgg8_bn/y_prob", 4), ("teachers/resnet8_slim/y_prob", 4)),  # one block of two teachers
    (("view_boxes", 1), ("view_boxes", 6)),  # a shared array (`valid` is all True: its files are alike)
])
def test_swapped_shard_files_fail_verify_naming_both_stop_a_student_and_are_repaired(
        first, second, teachers, clean_store, tmp_path):
    """Each file is sound on its own (its chunks decode, its checksums hold); only its place is wrong."""
    store = tmp_path / "store.zarr"
    shutil.copytree(clean_store, store)
    a, b = shard(store, *first), shard(store, *second)
    a_bytes, b_bytes = a.read_bytes(), b.read_bytes()
    a.write_bytes(b_bytes)
    b.write_bytes(a_bytes)
    result = invoke("store", "verify", store, exit_code=1)
    for array, block in (first, second):
        assert f"FAIL damaged: {array} block {block}: {said(array, MISPLACED)}\n" in result.output
    assert result.output.count("FAIL damaged:") == 2
    result = invoke("train-student", "--split", "test", "--store", store, "--method", "explain-kd", "--epochs", 2,
                    "--out-dir", tmp_path / "s", exit_code=1)  # two epochs read both views
    assert result.output.count("Error") == 1 and f"{said(first[0], MISPLACED)}; run `pipeline store verify" in result.output
    invoke("store", "verify", "--repair", store, exit_code=1)
    invoke(*two_view_args(teachers, store))
    assert "OK" in invoke("store", "verify", store).output
    assert_same_store(store, clean_store)


def test_labels_that_fail_their_reads_are_rewritten_from_the_data_set_by_the_extract_command(
        teachers, clean_store, tmp_path):
    """No repair needed for rows the data set holds (as after a write killed before its digest was recorded)."""
    store = tmp_path / "store.zarr"
    shutil.copytree(clean_store, store)
    a, b = shard(store, "labels", 2), shard(store, "labels", 5)
    a_bytes, b_bytes = a.read_bytes(), b.read_bytes()
    a.write_bytes(b_bytes)
    b.write_bytes(a_bytes)
    result = invoke(*two_view_args(teachers, store))
    assert "restoring labels block 2 of" in result.output and "restoring labels block 5 of" in result.output
    assert ": 0 of 9 blocks to extract" in result.output
    assert "OK" in invoke("store", "verify", store).output
    assert_same_store(store, clean_store)


def test_two_damaged_blocks_are_listed_and_repaired_by_the_quick_check(teachers, clean_store, tmp_path):
    store = tmp_path / "store.zarr"
    shutil.copytree(clean_store, store)
    truncate(shard(store, "teachers/resnet8_slim/cam", 8))  # the last, partial block (360 = 8 * 44 + 8)
    shard(store, "teachers/vgg8_bn/y_prob", 2).unlink()
    result = invoke("store", "verify", "--quick", "--repair", store, exit_code=1)
    assert result.output.count("FAIL damaged:") == 2
    assert "FAIL damaged: teachers/resnet8_slim/cam block 8: its shard index fails its checksum" in result.output
    assert "FAIL damaged: teachers/vgg8_bn/y_prob block 2: its shard file is missing (view 1)" in result.output
    assert ": 2 of 9 blocks to extract" in invoke(*two_view_args(teachers, store)).output
    assert "OK" in invoke("store", "verify", store).output
    assert_same_store(store, clean_store)


def test_a_lost_teacher_folder_or_images_array_is_noticed_and_rebuilt(teachers, clean_store, tmp_path):
    store = tmp_path / "store.zarr"
    shutil.copytree(clean_store, store)
    shutil.rmtree(store / "teachers/vgg8_bn")
    shutil.rmtree(store / "images")
    result = invoke("store", "verify", store, exit_code=1)
    assert "FAIL damaged: teacher 'vgg8_bn' is registered but its folder teachers/vgg8_bn is gone" in result.output
    assert "FAIL images: missing" in result.output and result.output.count("FAIL damaged:") == 1
    result = invoke("train-student", "--split", "test", "--store", store, "--method", "kd-avg", "--epochs", 1,
                    "--out-dir", tmp_path, exit_code=1)
    assert result.output.count("\n") == 1 and "teacher 'vgg8_bn' is registered but its folder" in result.output
    invoke("store", "drop-teacher", store, "vgg8_bn")
    result = invoke(*two_view_args(teachers, store))
    assert "restoring the lost array images" in result.output and ": 9 of 9 blocks to extract" in result.output
    assert "OK" in invoke("store", "verify", store).output
    assert_same_store(store, clean_store)


def test_a_block_mixing_zero_and_other_chunks_keeps_every_chunk(tmp_path):
    """zarr leaves a chunk equal to the fill value out of its shard (an empty index entry) unless told;
    the store's writes must keep it, or a lost chunk could not be told from a chunk of zeros."""
    from pipeline.store.teacher_store import TeacherStore
    identity = {"name": "toy", "split": "train", "num_samples": 8, "num_classes": 3, "image_shape": [2, 2, 1],
                "ids_sha256": "x"}
    store = TeacherStore.create(tmp_path / "s.zarr", identity, np.zeros(8), None, "label", block_size=8,
                                chunks_per_block=2)
    store.add_teacher("t", {"arch": "a", "weights_sha256": "w", "target_layer": "l", "transform": {}, "map_shape": [2, 2]})
    arrays = {field: np.zeros((8, *shape[1:]), dtype) for field, (shape, dtype) in store.teacher_shapes([2, 2]).items()}
    arrays["cam"][4:] = 7  # chunk 0 all zeros, chunk 1 not
    store.write_samples(0, {"valid": np.arange(8) >= 4, "view_boxes": np.zeros((8, 1, 4), np.int32),
                            "view_flips": np.zeros((8, 1), bool)})
    store.write_block("t", 0, arrays)
    for array in ["labels", "valid", *(f"teachers/t/{field}" for field in arrays)]:
        path = next((tmp_path / "s.zarr" / array / "c").rglob("*"))
        while path.is_dir():
            path = next(path.iterdir())
        index = np.frombuffer(path.read_bytes()[-(16 * 2 + 4):-4], "<u8")
        assert (index != 2**64 - 1).all(), array  # no chunk left out


def test_a_damaged_finished_mark_is_reported_and_its_block_recomputed(teachers, clean_store, tmp_path):
    store = tmp_path / "store.zarr"
    shutil.copytree(clean_store, store)
    mark = store / "teachers/vgg8_bn/progress/c/4"
    flip(mark, mark.stat().st_size - 2)  # inside the mark's crc32c
    result = invoke("store", "info", store, exit_code=1)
    assert "teachers/vgg8_bn/progress: it does not decode (checksum mismatch)" in result.output
    result = invoke("store", "verify", "--repair", store, exit_code=1)
    assert "FAIL damaged: teachers/vgg8_bn/progress block 4: finished mark does not decode\n" in result.output
    assert ": 1 of 9 blocks to extract" in invoke(*two_view_args(teachers, store)).output
    assert "OK" in invoke("store", "verify", store).output
    assert_same_store(store, clean_store)


def test_every_chunk_holds_a_checksum(clean_store):
    """Plain zarr reads the store, and every array's chunks end in crc32c."""
    group = zarr.open_group(clean_store, mode="r")
    arrays = [array for _, array in group.arrays()] + [
        array for _, teacher in group["teachers"].groups() for _, array in teacher.arrays()]
    assert len(arrays) == 6 + 2 * 10  # shared arrays and their digests; each teacher's 8 fields, mark and digests
    for array in arrays:
        assert [c.to_dict()["name"] for c in array.compressors][-1] == "crc32c", array.path
