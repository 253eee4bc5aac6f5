"""A store you can trust: kill and resume, parallel writers, fingerprints, no NaN, determinism."""

import os
import signal
import time

import numpy as np
import pytest
import torch
import zarr

from conftest import assert_same_store, extract_args, invoke, make_teacher, store_arrays
from pipeline.store.layout import FORMAT, VERSION
from pipeline.store.teacher_store import TeacherStore


def split_test_args(teachers, store, *extra):
    """Extraction of digits' test split (360 images: 12 blocks of 32), a third of the train split's work."""
    return extract_args(teachers, store, "--split", "test", *extra)


@pytest.fixture(scope="module")
def clean_store(digits_test_store):
    return digits_test_store  # conftest's extraction of the test split: split_test_args, uninterrupted


def run_pipeline(args, output, environ=None):
    """`pipeline ARGS` in this process, printing into the file `output`, with `environ` set (the forkserver's
    environment is that of its start); exits with the command's status."""
    import contextlib

    from pipeline.cli import main

    os.environ.update(environ or {})
    with open(output, "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        main([str(a) for a in args], prog_name="pipeline")


class spawn:
    """`pipeline ARGS` in a process of its own, with Popen's poll, wait, communicate, pid and returncode. The process
    comes from the forkserver (conftest preloads torch and the library there), not from a new interpreter that
    imports them anew (5 s a process); it writes the store as any process does, and SIGKILL kills it as any."""

    def __init__(self, args, environ=None):
        import multiprocessing
        import tempfile

        self.output = tempfile.NamedTemporaryFile("r", suffix=".out")
        self.process = multiprocessing.get_context("forkserver").Process(target=run_pipeline,
                                                                         args=(args, self.output.name, environ))
        self.process.start()
        self.pid = self.process.pid

    @property
    def returncode(self):
        return self.process.exitcode

    def poll(self):
        return self.process.exitcode

    def wait(self, timeout=None):
        self.process.join(timeout)
        return self.process.exitcode

    def communicate(self, timeout=None):
        self.wait(timeout)
        return self.output.read(), None


def finished_blocks(store):
    if not (store / "teachers" / "vgg8_bn" / "progress" / "zarr.json").exists():
        return 0
    return int(zarr.open_group(store, mode="r")["teachers/vgg8_bn/progress"][...].sum())


def kill_mid_run(args, finished, environ=None) -> int:
    """Run `pipeline ARGS` in a process of its own, SIGKILL it once `finished()` counts 3 blocks, and return the
    blocks finished then (checked to be mid-run: 3 to 11 of 12)."""
    process = spawn(args, environ)
    deadline = time.time() + 120
    while finished() < 3 and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done = finished()
    assert 3 <= done < 12, f"the kill should land mid-run, {done} of 12 blocks were finished"
    return done


def test_killed_extraction_resumes_to_an_identical_store(teachers, clean_store, tmp_path):
    store = tmp_path / "store.zarr"
    done = kill_mid_run(split_test_args(teachers, store), lambda: finished_blocks(store))

    result = invoke(*split_test_args(teachers, store))
    assert f"{12 - done} of 12 blocks to extract" in result.output or f"{11 - done} of 12" in result.output
    assert_same_store(store, clean_store)


def test_an_exception_half_way_leaves_a_resumable_store(teachers, clean_store, tmp_path, monkeypatch):
    store = tmp_path / "store.zarr"
    original, calls = TeacherStore.write_block, []

    def failing_write(self, name, block, arrays):
        calls.append(block)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        original(self, name, block, arrays)

    monkeypatch.setattr(TeacherStore, "write_block", failing_write)
    failed = invoke(*split_test_args(teachers, store), exit_code=1)
    assert "Error: no space left on device; finished blocks and checkpoints are kept" in failed.output
    monkeypatch.setattr(TeacherStore, "write_block", original)
    assert 0 < len(TeacherStore.open(store).finished_blocks(["resnet8_slim"])) < 12
    invoke(*split_test_args(teachers, store))
    assert_same_store(store, clean_store)


def test_two_processes_with_disjoint_block_parts_write_the_same_store(teachers, clean_store, tmp_path):
    store = tmp_path / "store.zarr"
    processes = [spawn(split_test_args(teachers, store, "--blocks", part)) for part in ("1/2", "2/2")]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    assert any("6 of 12 blocks to extract (part 1/2)" in out for out in outputs)
    assert any("6 of 12 blocks to extract (part 2/2)" in out for out in outputs)
    assert_same_store(store, clean_store)


def test_same_command_twice_gives_the_same_store(teachers, clean_store, tmp_path):
    invoke(*split_test_args(teachers, tmp_path / "again.zarr"))
    assert_same_store(tmp_path / "again.zarr", clean_store)


def test_adding_a_teacher_extracts_only_it_and_dropping_leaves_the_rest(teachers, tmp_path):
    store = tmp_path / "store.zarr"
    invoke(*split_test_args(teachers[:1], store))
    first = store / "teachers" / "resnet8_slim"
    stamps = {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()}
    before = store_arrays(store)

    invoke(*split_test_args(teachers, store))
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()} == stamps  # not rewritten
    assert TeacherStore.open(store).teachers == ["resnet8_slim", "vgg8_bn"]
    assert TeacherStore.open(store).pending_blocks("vgg8_bn") == []

    result = invoke("store", "drop-teacher", store, "vgg8_bn")
    assert "it holds: resnet8_slim" in result.output
    after = store_arrays(store)
    assert sorted(after) == sorted(before)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])
    invoke("store", "verify", store)
    invoke("store", "drop-teacher", store, "nope", exit_code=1)


def test_student_refuses_a_store_of_other_data_or_an_incomplete_one(teachers, tmp_path):
    store = tmp_path / "store.zarr"
    invoke(*extract_args(teachers, store, "--blocks", "1/3"))
    args = ["train-student", "--store", store, "--method", "kd-avg", "--epochs", 1, "--out-dir", tmp_path / "s"]

    result = invoke(*args, "--split-seed", 1, exit_code=1)
    assert "was made from dataset.ids_sha256=" in result.output and result.output.count("\n") == 1
    result = invoke(*args, "--split", "test", exit_code=1)
    assert "was made from dataset.split='train', not 'test'" in result.output

    result = invoke(*args, exit_code=1)
    assert "is incomplete (12/36 blocks finished for resnet8_slim, vgg8_bn)" in result.output
    assert "--allow-partial" in result.output
    result = invoke(*args, "--allow-partial")
    assert "--allow-partial: training on 384 of 1149 samples" in result.output


def test_empty_maps_are_stored_as_zeros_never_nan(tmp_path):
    """Zeroed heads give Grad-CAMs with no positive evidence on both Grad-CAM paths."""
    flat = [make_teacher(tmp_path / f"{arch}.pt", arch, zero_head=True) for arch in ("resnet8_slim", "vgg8_bn")]
    store = tmp_path / "store.zarr"
    invoke(*split_test_args(flat, store))
    arrays = store_arrays(store)
    for arch in ("resnet8_slim", "vgg8_bn"):
        assert (arrays[f"teachers/{arch}/cam"] == 0).all()
        assert (arrays[f"teachers/{arch}/cam_max"] == 0).all()
        for field in ("logits", "cam_max", "y_prob", "o_prob"):
            assert np.isfinite(arrays[f"teachers/{arch}/{field}"].astype(np.float64)).all()
    assert "OK" in invoke("store", "verify", store).output


def test_verify_and_info_report_what_is_wrong(clean_store, tmp_path):
    result = invoke("store", "info", clean_store)
    assert "complete   yes" in result.output and "best_by_tie" in result.output and "ties decided" in result.output
    assert "resnet8_slim" in result.output and "8x8" in result.output and "4x4" in result.output

    import shutil
    broken = tmp_path / "broken.zarr"
    shutil.copytree(clean_store, broken)
    group = zarr.open_group(broken, mode="r+")
    y = group["teachers/vgg8_bn/y_prob"][0:32]
    y[3] = np.nan
    group["teachers/vgg8_bn/y_prob"][0:32] = y
    group["teachers/resnet8_slim/progress"][7] = False
    explained = group["teachers/vgg8_bn/cam_class"][64:96]
    explained[5] = (explained[5] + 1) % 10  # a map of another class than the label, in a label store
    group["teachers/vgg8_bn/cam_class"][64:96] = explained
    store = TeacherStore.open(broken, mode="r+")
    for block in (0, 2):  # values a faulty writer wrote there, bound to their place as it would have
        store.digests.bind("vgg8_bn", block)
    result = invoke("store", "verify", broken, exit_code=1)
    assert "FAIL vgg8_bn/y_prob: NaN or infinite values in block 0" in result.output
    assert "FAIL vgg8_bn/cam_class: a map of a class other than the label in block 2" in result.output
    assert "FAIL resnet8_slim: 1 of 12 blocks unfinished (first: 7)" in result.output
    assert "complete   no" in invoke("store", "info", broken).output


def test_interrupted_creation_is_redone_and_foreign_stores_are_refused(teachers, clean_store, tmp_path):
    half = tmp_path / "half.zarr"
    zarr.open_group(half, mode="w").attrs.update({"format": FORMAT, "version": VERSION})  # killed in create()
    result = invoke("store", "info", half, exit_code=1)
    assert "was interrupted while being created" in result.output
    invoke(*split_test_args(teachers, half))
    assert_same_store(half, clean_store)

    foreign = tmp_path / "foreign.zarr"
    zarr.open_group(foreign, mode="w").attrs["title"] = "somebody else's data"
    for mode in ("error", "replace"):  # replace recomputes our own stores only, never deletes others' data
        result = invoke(*split_test_args(teachers, foreign, "--on-change", mode), exit_code=1)
        assert f"is not a {FORMAT} v{VERSION} store (format=None, version=None)" in result.output
        assert zarr.open_group(foreign, mode="r").attrs["title"] == "somebody else's data"


def test_unreadable_teacher_checkpoint_fails_cleanly_before_touching_the_store(teachers, clean_store, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    before = store_arrays(clean_store)
    result = invoke(*split_test_args([teachers[0], bad], clean_store), exit_code=1)
    assert f"checkpoint {bad} cannot be read" in result.output and result.output.count("\n") == 1
    after = store_arrays(clean_store)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])


def test_student_training_is_deterministic_on_cpu(clean_store, tmp_path):
    for run in ("a", "b"):
        invoke("train-student", "--split", "test", "--store", clean_store, "--method", "explain-kd", "--epochs", 1,
               "--device", "cpu", "--out-dir", tmp_path, "--run-name", run)
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # three extractions: CI runs it
def test_on_change_replace_recomputes_what_differs_and_drops_unlisted_teachers(teachers, clean_store, tmp_path):
    import shutil

    store = tmp_path / "store.zarr"
    shutil.copytree(clean_store, store)
    retrained = make_teacher(tmp_path / "vgg8_bn.pt", "vgg8_bn", seed=5)  # same name, other weights
    refused = invoke(*split_test_args([teachers[0], retrained], store), exit_code=1)
    assert "already holds a different teacher 'vgg8_bn' (differs in: weights_sha256)" in refused.output
    assert "--on-change replace" in refused.output
    first = store / "teachers" / "resnet8_slim"
    stamps = {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()}
    result = invoke(*split_test_args([teachers[0], retrained], store, "--on-change", "replace"))
    assert "recomputing it" in result.output and "12 of 12 blocks to extract" in result.output
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()} == stamps  # resnet8_slim kept
    fresh = tmp_path / "fresh.zarr"
    invoke(*split_test_args([teachers[0], retrained], fresh))
    assert_same_store(store, fresh)

    result = invoke(*split_test_args(teachers[:1], store, "--on-change", "replace"))
    assert "dropping teacher vgg8_bn" in result.output and TeacherStore.open(store).teachers == ["resnet8_slim"]
    result = invoke(*split_test_args(teachers[:1], store, "--split-seed", 1, "--on-change", "replace"))
    assert "replacing" in result.output and "12 of 12 blocks to extract" in result.output
    assert TeacherStore.open(store).attrs["dataset"]["ids_sha256"] != zarr.open_group(fresh).attrs["dataset"]["ids_sha256"]
