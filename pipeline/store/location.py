"""Where a teacher store's objects live: a folder, or a prefix in an object store (`s3://`, `gs://`).

zarr writes and reads the arrays and their metadata through `zarr_store`; the store's own reads of whole shard
files, and of their indexes, go through `read` and `read_tail`, one request each, so stage two's decoder gets
the same bytes from a bucket as from a file. `s3://` takes its credentials and endpoint from the usual
environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_REGION, ...); `file://` is a folder.
"""

import fcntl
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import PipelineError

BUCKET_SCHEMES = ("s3", "gs")
REQUESTS_AT_ONCE = 16  # a bucket store's reads in flight, per process (shared by the blocks read ahead)
LOCK_REFRESH_SECONDS = 30  # a creator holding a bucket store's lock object rewrites it this often ...
LOCK_STALE_SECONDS = 300  # ... so one not rewritten for this long was left by a process that is gone


class StoreUnreachable(PipelineError):
    """A bucket that did not answer as a store's (network, endpoint, credentials): never damage of the store."""


class Location:
    """The store's root: `str()` is the path or URL as the user gave it (every message names it so)."""

    def __init__(self, text: str):
        self.text = text

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.text!r})"

    def zarr_store(self, read_only: bool):
        raise NotImplementedError

    def read(self, key: str) -> bytes:
        """The whole object `key` (FileNotFoundError where there is none)."""
        raise NotImplementedError

    def read_tail(self, key: str, length: int) -> tuple[bytes, int]:
        """The last `length` bytes of `key` (all of it, if shorter) and its size."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        """Delete the object `key`, if it is there."""
        raise NotImplementedError

    def delete_all(self) -> None:
        """Delete every object of the store."""
        raise NotImplementedError

    def size(self, prefix: str = "") -> int:
        """The bytes of every object under `prefix` (a folder of the store; "": all of it)."""
        raise NotImplementedError

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Serialise store creation and teacher registration between processes, where the location can."""
        yield

    def map(self, function, items) -> list:
        """[function(item) for item in items], in order: one after another from a folder (the page cache reads
        ahead), at once from a bucket (each read is a request that waits on the network)."""
        return [function(item) for item in items]


class Folder(Location):
    def __init__(self, text: str, path: Path):
        super().__init__(text)
        self.path = path

    def __fspath__(self) -> str:
        return str(self.path)

    def __truediv__(self, key: str) -> Path:
        return self.path / key

    def zarr_store(self, read_only: bool):
        import zarr

        return zarr.storage.LocalStore(self.path, read_only=read_only)

    def read(self, key):
        return (self.path / key).read_bytes()

    def read_tail(self, key, length):
        with open(self.path / key, "rb") as file:
            size = file.seek(0, 2)
            file.seek(max(0, size - length))
            return file.read(), size

    def exists(self, key):
        return (self.path / key).is_file()

    def delete(self, key):
        (self.path / key).unlink(missing_ok=True)

    def delete_all(self):
        shutil.rmtree(self.path)

    def size(self, prefix=""):
        return sum(f.stat().st_size for f in (self.path / prefix).rglob("*") if f.is_file())

    @contextmanager
    def locked(self):
        """flock on the parent folder: the creators of one store on one file system wait for each other."""
        parent = self.path.absolute().parent
        parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(parent, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


class Bucket(Location):
    """A prefix in an object store, through obstore (one request per read, whole objects or their tails)."""

    def __init__(self, text: str):
        super().__init__(text)
        parent, _, self.name = text.rpartition("/")
        if parent.endswith(":/"):
            raise PipelineError(f"store {text} names a bucket, not a store in it; add the store's name: "
                                f"{text}/train.zarr")
        self.objects, self.beside = open_bucket(text), open_bucket(parent)
        self.requests, self.metadata_requests, self.bytes_read = 0, 0, 0  # reads, for the figures of a bucket
        self.counting = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=REQUESTS_AT_ONCE)

    def map(self, function, items):
        return list(self.pool.map(function, items))

    def zarr_store(self, read_only: bool):
        import zarr

        return zarr.storage.ObjectStore(self.objects, read_only=read_only)

    def call(self, what: str, key: str, request, *args, **kwargs):
        """obstore's `request`, its failures one line naming the store (FileNotFoundError passes: a missing object
        is the caller's to judge)."""
        try:
            return request(self.objects, *args, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as error:
            raise StoreUnreachable(f"cannot {what} {self.text}/{key}: {str(error).splitlines()[0]}; check the "
                                   "bucket and store names, AWS_ENDPOINT_URL and the credentials") from None

    def count(self, key: str, data: bytes) -> bytes:
        with self.counting:
            self.requests += 1
            self.metadata_requests += key.endswith("zarr.json")
            self.bytes_read += len(data)
        return data

    def read(self, key):
        import obstore

        return self.count(key, bytes(self.call("read", key, obstore.get, key).bytes()))

    def read_tail(self, key, length):
        import obstore

        if self.call("read", key, obstore.head, key)["size"] <= length:  # a range past an object's start is
            data = self.read(key)  # refused: an empty or short object is read whole
            return data, len(data)
        result = self.call("read", key, obstore.get, key, options={"range": {"suffix": length}})
        return self.count(key, bytes(result.bytes())), int(result.meta["size"])  # the size of what was read

    def exists(self, key):
        import obstore

        try:
            self.call("read", key, obstore.head, key)
        except FileNotFoundError:
            self.count(key, b"")
            return False
        self.count(key, b"")
        return True

    def delete(self, key):
        import obstore

        self.call("delete", key, obstore.delete, key)  # an absent object is no error (S3's DELETE)

    def delete_all(self):
        """The root's zarr.json first: a deletion cut short leaves no store that opens as complete."""
        import obstore

        self.delete("zarr.json")
        for batch in self.call("list", "", obstore.list, chunk_size=1000):
            self.call("delete", "", obstore.delete, [item["path"] for item in batch])

    def size(self, prefix=""):
        import obstore

        return sum(item["size"] for batch in self.call("list", prefix, obstore.list, prefix=prefix or None)
                   for item in batch)

    @contextmanager
    def locked(self):
        """A lock object beside the store (`<name>.lock`), created only where there is none (a conditional write:
        S3's If-None-Match) and rewritten every LOCK_REFRESH_SECONDS while held; released by deleting it, only if it
        is still this holder's. A lock not rewritten for LOCK_STALE_SECONDS is named, with the fix."""
        import obstore
        from obstore.exceptions import AlreadyExistsError

        key, token = f"{self.name}.lock", f"{socket.gethostname()} {os.getpid()} {uuid.uuid4().hex}"
        put = lambda **mode: obstore.put(self.beside, key, token.encode(), **mode)  # noqa: E731
        while True:
            try:
                put(mode="create")
                break
            except AlreadyExistsError:
                age = self.lock_age(key)
                if age is not None and age > LOCK_STALE_SECONDS:
                    raise PipelineError(f"{self.text}.lock ({self.lock_holder(key)}) has not been renewed for "
                                        f"{age:.0f} s: if no extraction of this store is running, delete that "
                                        "object and rerun") from None
                time.sleep(0.5)
        try:
            put(mode="create")
        except AlreadyExistsError:
            pass
        else:
            obstore.delete(self.beside, key)
            raise PipelineError(f"the object store of {self.text} ignores conditional writes, so processes cannot "
                                "take turns creating a store there: create it from one process first")
        held = threading.Event()
        renewer = threading.Thread(target=self.renew, args=(put, held), daemon=True)
        renewer.start()
        try:
            yield
        finally:
            held.set()
            renewer.join()
            if self.lock_holder(key) == token:
                obstore.delete(self.beside, key)

    @staticmethod
    def renew(put, released: threading.Event) -> None:
        """Rewrite the lock until released; a failed rewrite is tried again at the next turn (a waiter calls the lock
        stale only after LOCK_STALE_SECONDS without one)."""
        while not released.wait(LOCK_REFRESH_SECONDS):
            try:
                put()
            except Exception:  # noqa: BLE001 - a network hiccup: the next turn rewrites it
                continue

    def lock_age(self, key: str) -> float | None:
        import obstore

        try:
            return time.time() - obstore.head(self.beside, key)["last_modified"].timestamp()
        except FileNotFoundError:
            return None

    def lock_holder(self, key: str) -> str | None:
        import obstore

        try:
            return bytes(obstore.get(self.beside, key).bytes()).decode()
        except FileNotFoundError:
            return None


FORKED_AFTER_USE = False  # obstore's runtime does not survive a fork: a forked child must not use a bucket


def _forked() -> None:
    global FORKED_AFTER_USE
    FORKED_AFTER_USE = FORKED_AFTER_USE or bool(BUCKETS)


os.register_at_fork(after_in_child=_forked)
BUCKETS: dict[str, Bucket] = {}  # the open stores in buckets of this process, by URL
OPENING = threading.Lock()


def open_bucket(url: str):
    """obstore's client of `url` (credentials and endpoint from the environment; plain http where the endpoint
    says so, as a local test server's)."""
    try:
        from obstore.store import from_url
    except ImportError:  # pragma: no cover - obstore is a dependency
        raise PipelineError(f"{url} is in an object store, which needs obstore: pip install obstore") from None
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    options = {"allow_http": True} if url.startswith("s3://") and endpoint.startswith("http://") else None
    try:
        return from_url(url, client_options=options)
    except Exception as error:
        raise PipelineError(f"cannot open {url}: {str(error).splitlines()[0]}") from None


def forget_buckets() -> None:
    """Drop this process's clients (a test server stopped: the next use opens new ones)."""
    with OPENING:
        BUCKETS.clear()


def scheme_of(text: str) -> str:
    return text.split("://", 1)[0] if "://" in text else ""


def in_bucket(path: "str | os.PathLike") -> bool:
    """Whether `path` names a store in an object store (s3://, gs://), not a folder."""
    return scheme_of(os.fspath(path)) in BUCKET_SCHEMES


def location(path: "str | os.PathLike | Location") -> Location:
    """The location of a store given as a path, `file://` URL or object-store URL (s3://bucket/prefix/x.zarr)."""
    if isinstance(path, Location):
        return path
    text = os.fspath(path)
    scheme = scheme_of(text)
    if scheme in BUCKET_SCHEMES:  # one client per store and process
        if FORKED_AFTER_USE:
            raise PipelineError(f"store {text} is in a bucket, and this process was forked from one that had used a "
                                "bucket, which obstore cannot survive: start processes with forkserver or spawn")
        text = text.rstrip("/")
        with OPENING:
            if text not in BUCKETS:
                BUCKETS[text] = Bucket(text)
            return BUCKETS[text]
    if scheme == "file":
        return Folder(text, Path(text[len("file://"):]))
    if scheme:
        raise PipelineError(f"unknown store URL scheme {scheme}:// in {text}; use a path, file://, "
                            + ", ".join(f"{s}://" for s in BUCKET_SCHEMES))
    return Folder(text, Path(text))
