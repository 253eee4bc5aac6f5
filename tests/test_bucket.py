"""Stores in object storage: the same commands on an s3:// URL, against a real S3 API (moto's server, started
here as a process on a free port; nothing of the project is mocked)."""

import os
import shutil
import subprocess
import time

import pytest
import torch

from conftest import assert_same_store, extract_args, invoke
from pipeline.errors import PipelineError
from pipeline.fabricate import local_s3
from pipeline.store.location import Bucket, location

pytest.importorskip("moto")  # the dev extra: moto[server]


@pytest.fixture(scope="module")
def bucket():
    """s3://stores on a moto server of this module's own, with the environment a user sets for a bucket."""
    with local_s3() as url:
        yield url


def objects(url: str) -> dict[str, bytes]:
    """Every object of the store at `url`, by its key under the store."""
    import obstore

    where = location(url)
    assert isinstance(where, Bucket)
    return {item["path"]: where.read(item["path"]) for batch in obstore.list(where.objects) for item in batch}


def put(url: str, key: str, data: bytes) -> None:
    import obstore

    obstore.put(location(url).objects, key, data)


@pytest.fixture(scope="module")
def bucket_store(teachers, bucket):
    """digits' test split extracted by `teachers` into the bucket (the conftest's digits_test_store, in a bucket)."""
    url = f"{bucket}/digits/test.zarr"
    invoke(*extract_args(teachers, url, "--split", "test"))
    return url


def copied(source: str, name: str) -> str:
    """A copy, made in the bucket itself, of the store at `source`, as s3://stores/<name>."""
    import obstore

    from pipeline.store.location import open_bucket

    root, prefix = open_bucket("s3://stores"), source.split("s3://stores/", 1)[1]
    for batch in obstore.list(root, prefix=f"{prefix}/"):
        for item in batch:
            obstore.copy(root, item["path"], name + item["path"][len(prefix):])
    return f"s3://stores/{name}"


@pytest.mark.slow  # an extraction into the bucket and one of 4 blocks: CI runs it
def test_a_store_in_a_bucket_is_the_store_on_disk_and_damage_there_is_found_and_repaired(
        teachers, digits_test_store, bucket_store):
    assert_same_store(bucket_store, digits_test_store)
    stored = objects(bucket_store)
    on_disk = {str(p.relative_to(digits_test_store)): p.read_bytes() for p in digits_test_store.rglob("*")
               if p.is_file()}
    assert sorted(stored) == sorted(on_disk)  # the same objects as files, and every shard the same bytes
    assert all(stored[key] == on_disk[key] for key in stored if "/c/" in key)
    assert "OK" in invoke("store", "verify", bucket_store).output

    url = copied(bucket_store, "damaged.zarr")
    lost, altered, truncated = ("teachers/vgg8_bn/logits/c/5/0/0", "teachers/resnet8_slim/cam/c/7/0/0/0",
                                "teachers/vgg8_bn/y_prob/c/9/0")
    location(url).delete(lost)
    data = bytearray(stored[altered])
    data[len(data) // 3] ^= 0x40
    put(url, altered, bytes(data))
    put(url, truncated, stored[truncated][:len(stored[truncated]) // 2])
    emptied = "teachers/resnet8_slim/y_prob/c/2/0"
    put(url, emptied, b"")
    result = invoke("store", "verify", url, exit_code=1)
    assert "FAIL damaged: teachers/vgg8_bn/logits block 5: its shard file is missing\n" in result.output
    assert "FAIL damaged: teachers/resnet8_slim/cam block 7: it does not decode (checksum mismatch)\n" in result.output
    assert "FAIL damaged: teachers/vgg8_bn/y_prob block 9: its shard index fails its checksum (truncated or " \
           "damaged)\n" in result.output
    assert "FAIL damaged: teachers/resnet8_slim/y_prob block 2: its shard file is empty\n" in result.output
    assert result.output.count("FAIL damaged:") == 4
    quick = invoke("store", "verify", "--quick", url, exit_code=1).output  # indexes only: not the altered chunk
    assert "FAIL damaged: teachers/vgg8_bn/logits block 5: its shard file is missing\n" in quick
    assert "FAIL damaged: teachers/vgg8_bn/y_prob block 9: its shard index fails its checksum" in quick
    assert "FAIL damaged: teachers/resnet8_slim/y_prob block 2: its shard file is empty\n" in quick
    assert quick.count("FAIL damaged:") == 3

    invoke("store", "verify", "--repair", url, exit_code=1)
    assert "4 of 12 blocks to extract" in invoke(*extract_args(teachers, url, "--split", "test")).output
    assert "OK" in invoke("store", "verify", url).output
    assert_same_store(url, digits_test_store)


def test_a_bucket_url_without_its_store_says_so_and_unknown_schemes_list_the_valid(bucket):
    result = invoke("store", "info", f"{bucket}/nothing-here.zarr", exit_code=1)
    assert "no teacher store at s3://stores/nothing-here.zarr; write one with `pipeline extract-teachers`" in \
        result.output
    result = invoke("store", "info", "ftp://host/x.zarr", exit_code=1)
    assert "unknown store URL scheme ftp:// in ftp://host/x.zarr; use a path, file://, s3://, gs://" in result.output


def test_a_file_url_is_the_folder(tmp_path, digits_test_store):
    shutil.copytree(digits_test_store, tmp_path / "s.zarr")
    assert "OK" in invoke("store", "verify", f"file://{tmp_path / 's.zarr'}").output
    assert location(f"file://{tmp_path}/s.zarr").read("labels/c/0") == \
        (tmp_path / "s.zarr" / "labels" / "c" / "0").read_bytes()
    assert os.fspath(location(f"file://{tmp_path}/s.zarr")) == str(tmp_path / "s.zarr")


@pytest.mark.slow  # waits out a held lock: CI runs it
def test_creators_of_one_bucket_store_take_turns_on_its_lock_object(bucket, monkeypatch):
    import threading

    import boto3

    from pipeline.store import location as locations

    s3, store, events = boto3.client("s3"), f"{bucket}/locked.zarr", []

    def second_creator():
        with location(store).locked():
            events.append("second in")

    def lock_object():
        return s3.get_object(Bucket="stores", Key="locked.zarr.lock")

    monkeypatch.setattr(locations, "LOCK_REFRESH_SECONDS", 0.3)
    with location(store).locked():
        first = lock_object()  # the lock object, beside the store
        waiter = threading.Thread(target=second_creator)
        waiter.start()
        time.sleep(1.5)
        assert lock_object()["LastModified"] > first["LastModified"]  # renewed while held
        events.append("first out")
    waiter.join(timeout=10)
    assert events == ["first out", "second in"]  # the second creator waited for the first's lock to go
    assert "Contents" not in s3.list_objects_v2(Bucket="stores", Prefix="locked.zarr.lock")

    with location(store).locked():  # a lock that another creator took over is left to it at release
        s3.put_object(Bucket="stores", Key="locked.zarr.lock", Body=b"another host 7 token")
    assert lock_object()["Body"].read() == b"another host 7 token"
    monkeypatch.setattr(locations, "LOCK_STALE_SECONDS", 0)  # and a lock not renewed is named, with the fix
    time.sleep(1.1)
    with pytest.raises(PipelineError, match=r"s3://stores/locked.zarr.lock \(another host 7 token\) has not been "
                                            r"renewed for \d+ s: if no extraction of this store is running, delete "
                                            "that object and rerun"):
        with location(store).locked():
            pass


def test_a_url_naming_only_a_bucket_asks_for_the_store_name(bucket):
    result = invoke("store", "info", bucket, exit_code=1)
    assert "store s3://stores names a bucket, not a store in it; add the store's name: s3://stores/train.zarr" in \
        result.output


def finished(url: str) -> int:
    from pipeline.store.teacher_store import TeacherStore

    try:
        return len(TeacherStore.open(url).finished_blocks(["vgg8_bn"]))
    except Exception:  # not created yet, or its teacher not registered yet
        return 0


@pytest.mark.slow  # an extraction killed, resumed on a dask cluster: CI runs it
def test_an_extraction_killed_while_writing_to_a_bucket_is_finished_by_dask_workers_into_the_same_store(
        teachers, digits_test_store, bucket):
    from test_store_integrity import kill_mid_run

    url = f"{bucket}/killed/test.zarr"
    done = kill_mid_run(extract_args(teachers, url, "--split", "test"), lambda: finished(url),
                        {k: v for k, v in os.environ.items() if k.startswith("AWS_")})
    result = invoke(*extract_args(teachers, url, "--split", "test", "--scheduler", "local:2"))
    assert f"{12 - done} of 12 blocks to extract on dask (local:2)" in result.output or \
        f"{11 - done} of 12 blocks to extract on dask (local:2)" in result.output
    assert_same_store(url, digits_test_store)
    assert "OK" in invoke("store", "verify", url).output


@pytest.mark.slow  # six students: CI runs it
def test_students_from_a_bucket_with_or_without_a_shared_cache_folder_learn_what_a_student_from_disk_learns(
        digits_test_store, bucket_store, tmp_path):
    import obstore

    from test_store_integrity import spawn

    url, cache = copied(bucket_store, "cached.zarr"), tmp_path / "cache"

    def student(store, run, *extra):
        return ["train-student", "--split", "test", "--store", store, "--method", "explain-kd", "--epochs", 1,
                "--device", "cpu", "--out-dir", tmp_path, "--run-name", run, *extra]

    def weights(run):
        return torch.load(tmp_path / run / "checkpoint.pt", weights_only=True)["state_dict"]

    invoke(*student(digits_test_store, "disk"))
    invoke(*student(bucket_store, "bucket"))
    environ = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    runs = [spawn(student(url, f"shared{i}", "--cache-dir", cache), environ) for i in (0, 1)]  # at once, one folder
    for run in runs:
        assert run.wait(600) == 0, run.communicate()[0]
    entries = sorted(cache.glob("*/*.shard"))
    assert entries and not list(cache.glob("*/.incoming-*"))  # placed whole, nothing half-written left

    damaged = bytearray(entries[0].read_bytes())
    damaged[len(damaged) // 2] ^= 0x40
    entries[0].write_bytes(bytes(damaged))  # a damaged entry is dropped and fetched again
    invoke(*student(url, "refetched", "--cache-dir", cache))
    assert entries[0].read_bytes() != bytes(damaged)

    objects_of = location(url).objects
    lost = [item["path"] for batch in obstore.list(objects_of, prefix="teachers") for item in batch
            if "/logits/c/" in item["path"]]
    obstore.delete(objects_of, lost)  # the teachers' logits now live only in the cache folder
    invoke(*student(url, "from-cache", "--cache-dir", cache))
    reference = weights("disk")
    for run in ("bucket", "shared0", "shared1", "refetched", "from-cache"):
        assert all(torch.equal(reference[k], weights(run)[k]) for k in reference), run


def test_a_cache_folder_for_a_store_on_disk_is_refused(digits_test_store, tmp_path):
    result = invoke("train-student", "--split", "test", "--store", digits_test_store, "--cache-dir", tmp_path,
                    exit_code=1)
    assert f"--cache-dir keeps shard files fetched from a bucket, and store {digits_test_store} is a folder; " \
           "leave --cache-dir out" in result.output


@pytest.mark.slow  # dvc push and pull: CI runs it
def test_a_dvc_remote_in_the_bucket_carries_a_store_and_a_teacher(teachers, digits_test_store, bucket, tmp_path):
    import sys

    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(digits_test_store, repo / "store.zarr")
    shutil.copy(teachers[0], repo / "teacher.pt")

    def dvc(*args):
        done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc("init", "-q")
    dvc("remote", "add", "--default", "shared", f"{bucket}/dvc-remote")  # endpoint and keys from the environment
    dvc("add", "store.zarr", "teacher.pt")
    dvc("push")
    shutil.rmtree(repo / "store.zarr")
    shutil.rmtree(repo / ".dvc" / "cache")
    (repo / "teacher.pt").unlink()
    dvc("pull")
    assert "OK" in invoke("store", "verify", repo / "store.zarr").output
    assert_same_store(repo / "store.zarr", digits_test_store)
    assert (repo / "teacher.pt").read_bytes() == teachers[0].read_bytes()


def test_a_process_forked_after_a_bucket_was_used_stops_with_the_fix(bucket):
    location(f"{bucket}/forked.zarr")  # a client opened here, as a reader's parent would
    child = os.fork()
    if child == 0:  # obstore would hang here for good: the child must stop at once, saying why
        try:
            location(f"{bucket}/forked.zarr")
        except PipelineError as error:
            os._exit(3 if "forked from one that had used a bucket, which obstore cannot survive: start processes "
                     "with forkserver or spawn" in str(error) else 4)
        os._exit(5)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 3


def test_each_rank_fetches_only_the_shard_files_of_its_own_blocks(bucket, monkeypatch, rank=1):
    from test_stream import make_store

    from pipeline.stream import BlockStream

    url = f"{bucket}/ranks.zarr"
    store = make_store(url)  # 6 blocks of 4 rows
    stream = BlockStream(url, ["labels"], list(range(store.num_blocks)), batch_size=4, seed=5, rank=rank, ranks=2)
    mine = {block for window in stream.windows(0, 0) for block in window}
    fetched, read = [], Bucket.read
    monkeypatch.setattr(Bucket, "read", lambda self, key: fetched.append(key) or read(self, key))
    rows = sorted(row for batch in stream for row in batch["index"].tolist())
    assert rows == sorted(row for block in mine for row in range(*store.block_rows(block)))
    shards = [key for key in fetched if "/c/" in key]
    assert shards and {int(key.split("/c/")[1].split("/")[0]) for key in shards} == mine
