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
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import PipelineError

BUCKET_SCHEMES = ("s3", "gs")
BUCKETS: dict[tuple[int, str], "Bucket"] = {}  # the open stores in buckets, by process and URL
LOCK_WAIT_SECONDS = 600
REQUESTS_AT_ONCE = 16  # a bucket store's reads in flight for one block  # a creator waits this long for another's lock object, then names it


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
        parent, _, self.name = text.rstrip("/").rpartition("/")
        if parent.endswith(":/"):
            raise PipelineError(f"store {text} names a bucket, not a store in it; add the store's name: "
                                f"{text.rstrip('/')}/train.zarr")
        self.objects, self.beside = open_bucket(text.rstrip("/")), open_bucket(parent)
        self.requests, self.bytes_read, self.counting = 0, 0, threading.Lock()  # reads, for the figures of a bucket
        self.pool = ThreadPoolExecutor(max_workers=REQUESTS_AT_ONCE)

    def map(self, function, items):
        return list(self.pool.map(function, items))

    def count(self, data: bytes) -> bytes:
        with self.counting:
            self.requests += 1
            self.bytes_read += len(data)
        return data

    def zarr_store(self, read_only: bool):
        import zarr

        return zarr.storage.ObjectStore(self.objects, read_only=read_only)

    def read(self, key):
        import obstore

        try:
            return self.count(bytes(obstore.get(self.objects, key).bytes()))
        except FileNotFoundError:
            raise
        except Exception as error:
            raise self.failed("read", key, error) from None

    def read_tail(self, key, length):
        import obstore

        try:
            result = obstore.get(self.objects, key, options={"range": {"suffix": length}})
            return self.count(bytes(result.bytes())), int(result.meta["size"])
        except FileNotFoundError:
            raise
        except Exception as error:
            raise self.failed("read", key, error) from None

    def exists(self, key):
        import obstore

        try:
            obstore.head(self.objects, key)
        except FileNotFoundError:
            return False
        finally:
            self.count(b"")
        return True

    def delete(self, key):
        import obstore

        obstore.delete(self.objects, key)  # an absent object is no error (S3's DELETE)

    def delete_all(self):
        import obstore

        for batch in obstore.list(self.objects, chunk_size=1000):
            obstore.delete(self.objects, [item["path"] for item in batch])

    def size(self, prefix=""):
        import obstore

        return sum(item["size"] for batch in obstore.list(self.objects, prefix=prefix or None) for item in batch)

    @contextmanager
    def locked(self):
        """A lock object beside the store (`<name>.lock`), created only where there is none (a conditional
        write: S3's If-None-Match); released by deleting it."""
        import obstore
        from obstore.exceptions import AlreadyExistsError

        key, waited = f"{self.name}.lock", 0.0
        while True:
            try:
                obstore.put(self.beside, key, f"{socket.gethostname()} {os.getpid()}".encode(), mode="create")
                break
            except AlreadyExistsError:
                if waited >= LOCK_WAIT_SECONDS:
                    raise PipelineError(f"{self.text}.lock has been held for {LOCK_WAIT_SECONDS} s by another "
                                        "extraction; if none is running, delete that object and rerun") from None
                time.sleep(0.5)
                waited += 0.5
        try:
            yield
        finally:
            obstore.delete(self.beside, key)

    def failed(self, what: str, key: str, error: Exception) -> PipelineError:
        return PipelineError(f"cannot {what} {self.text}/{key}: {str(error).splitlines()[0]}")


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


def in_bucket(path: "str | os.PathLike") -> bool:
    """Whether `path` names a store in an object store (s3://, gs://), not a folder."""
    text = os.fspath(path)
    return "://" in text and text.split("://", 1)[0] in BUCKET_SCHEMES


def location(path: "str | os.PathLike | Location") -> Location:
    """The location of a store given as a path, `file://` URL or object-store URL (s3://bucket/prefix/x.zarr)."""
    if isinstance(path, Location):
        return path
    text = os.fspath(path)
    if in_bucket(text):  # one client per store and process (a forked process makes its own)
        if (os.getpid(), text) not in BUCKETS:
            BUCKETS[os.getpid(), text] = Bucket(text)
        return BUCKETS[os.getpid(), text]
    scheme = text.split("://", 1)[0] if "://" in text else ""
    if scheme == "file":
        return Folder(text, Path(text[len("file://"):]))
    if scheme:
        raise PipelineError(f"unknown store URL scheme {scheme}:// in {text}; use a path, file://, "
                            + ", ".join(f"{s}://" for s in BUCKET_SCHEMES))
    return Folder(text, Path(text))
