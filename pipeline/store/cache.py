"""A local folder of shard files fetched from a bucket, for later epochs and later runs (`--cache-dir`).

An entry is named by the digest recorded for its shard file (pipeline.store.digests: the SHA-256 of the file's
place, its writer and its bytes), so it is found only for exactly those bytes in exactly that place: a block
written again has a new digest and never meets its old entry, and every entry read is checked by the same
digest and checksums as a fresh read (a damaged entry is dropped and fetched again). Entries are placed
atomically (written to a temporary file, then renamed), so runs that share the folder never see half an entry;
when the folder outgrows its bound, the least recently used entries go (an entry's mtime is its last use), and so
do temporary files left by killed runs.
"""

import os
import tempfile
import threading
import time
from pathlib import Path

from pipeline.errors import PipelineError

SUFFIX, INCOMING = ".shard", ".incoming-"
LEFT_BEHIND_SECONDS = 3600  # a temporary file this old was left by a killed run


class ShardCache:
    def __init__(self, folder: str | Path, max_bytes: int):
        self.folder, self.max_bytes = Path(folder), int(max_bytes)
        self.lock = threading.Lock()  # the reader's threads share one cache
        self.added = 0  # bytes placed since the folder was last measured
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise self.failed(error) from None
        self.evict()  # a folder over its bound (a smaller --cache-gb than before) comes within it now

    def failed(self, error: OSError) -> PipelineError:
        return PipelineError(f"cache folder {self.folder}: {error.strerror or error}; free space there, pass a "
                             "smaller --cache-gb or another --cache-dir")

    def path(self, name: str) -> Path:
        return self.folder / name[:2] / f"{name}{SUFFIX}"

    def get(self, name: str) -> bytes | None:
        """The entry's bytes, its use recorded, or None (absent, or evicted by another run meanwhile)."""
        path = self.path(name)
        try:
            data = path.read_bytes()
            os.utime(path)
        except FileNotFoundError:
            return None
        except OSError as error:
            raise self.failed(error) from None
        return data

    def put(self, name: str, data: bytes) -> None:
        path = self.path(name)
        try:
            path.parent.mkdir(exist_ok=True)
            fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=INCOMING)
            try:
                with os.fdopen(fd, "wb") as file:
                    file.write(data)
                os.chmod(temporary, 0o644)  # mkstemp's 0600 would keep the entry from the folder's other users
                os.replace(temporary, path)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise
        except OSError as error:
            raise self.failed(error) from None
        with self.lock:
            self.added += len(data)
            due = self.added > self.max_bytes // 16  # measure now and then, not at every entry
        if due:
            self.evict()

    def drop(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last use, bytes, path) of every entry."""
        found = []
        for path in self.folder.glob(f"*/*{SUFFIX}"):
            try:
                stat = path.stat()
            except FileNotFoundError:  # evicted by another run meanwhile
                continue
            found.append((stat.st_mtime, stat.st_size, path))
        return found

    def evict(self) -> None:
        """Delete the least recently used entries until the folder is within its bound, and temporary files left by
        killed runs."""
        with self.lock:
            self.added = 0
            entries = sorted(self.entries())
            total = sum(size for _, size, _ in entries)
            for _, size, path in entries:
                if total <= self.max_bytes:
                    break
                path.unlink(missing_ok=True)
                total -= size
            for path in self.folder.glob(f"*/{INCOMING}*"):
                try:
                    if path.stat().st_mtime < time.time() - LEFT_BEHIND_SECONDS:
                        path.unlink(missing_ok=True)
                except FileNotFoundError:  # placed or removed by its run meanwhile
                    pass
