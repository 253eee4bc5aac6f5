"""Every shard file of a teacher store bound to its place by a recorded digest (pipeline.store.shards.Binding).

When a block is written, the digest of each of its files, taken with its array path, block, view and the
fingerprint of its writer, is recorded in `shard_digests`: the store's, for its shared arrays, and each
teacher's for its own. Every read checks it, so a file moved to another place, or left from an earlier
extraction, is damage.
"""

from typing import TYPE_CHECKING

import numpy as np
import zarr

from pipeline.store.layout import (DIGESTS, STORE_IDENTITY, digest_array, fingerprint, is_digests, is_viewed,
                                   owner_of, teacher_array)
from pipeline.store.shards import DIGEST_BYTES, Binding, ShardDamage, create_sharded, read_file, shard_rows

if TYPE_CHECKING:
    from pipeline.store.teacher_store import TeacherStore


class ShardDigests:
    """The digest records of one store: which files each writer binds, what was recorded, and recording it.
    `owner` is a teacher's name, or None for the store's shared arrays."""

    def __init__(self, store: "TeacherStore"):
        self.store = store
        self._writers: dict[str | None, str] = {}  # fixed while a teacher is registered
        self._files: dict[str | None, list[tuple[str, int]]] = {}

    def forget(self) -> None:
        """Drop what was read of the writers (a teacher was added, dropped or replaced)."""
        self._writers, self._files = {}, {}

    def files(self, owner: str | None) -> list[tuple[str, int]]:
        """(array, view) of every shard file of one block that `owner` writes, in the order of its digests."""
        store = self.store
        if owner not in self._files:
            arrays = store.shared_arrays if owner is None else [teacher_array(owner, f) for f in store.teacher_fields]
            self._files[owner] = [(array, view) for array in arrays
                                  for view in range(store.num_views if is_viewed(array) else 1)]
        return self._files[owner]

    def create(self, group: zarr.Group, owner: str | None) -> None:
        """The empty record of `owner`'s digests, one row per block, in `group` (the store's or the teacher's)."""
        create_sharded(group, DIGESTS, (self.store.num_blocks, len(self.files(owner)), DIGEST_BYTES), "uint8",
                       block_size=1, chunk=1, viewed=False)

    def writer(self, owner: str | None) -> str:
        """The fingerprint a shard's binding names: the store's for the shared arrays, the store's and its
        teacher's for a teacher's (its files belong to this store: another store's folder of a teacher of the
        same name, made with another target, views or data, is refused)."""
        if owner not in self._writers:
            store = fingerprint({k: self.store.attrs[k] for k in STORE_IDENTITY})
            self._writers[owner] = store if owner is None else \
                fingerprint({"store": store, "teacher": self.store.teacher_attrs(owner)["fingerprint"]})
        return self._writers[owner]

    def recorded(self, owner: str | None, block: int, missing_ok: bool = False) -> np.ndarray:
        """(files, 16) the digests recorded for `block`'s shard files of `owner` (zeros: none, with `missing_ok`
        where the record itself is missing)."""
        array = digest_array(owner)
        key = self.store.shard_key(array, block)
        if missing_ok and not self.store.location.exists(key):
            return np.zeros((len(self.files(owner)), DIGEST_BYTES), np.uint8)
        try:
            layout = self.store.layout(array)
            return shard_rows(read_file(self.store.location, key, layout)[0], layout, 0, 1)[0]
        except ShardDamage as damage:
            raise self.store.damaged(array, block, str(damage)) from None

    def bound(self, array: str, block: int, view: int, records: dict | None = None) -> tuple[Binding, bytes] | None:
        """The binding of `block`'s shard file of `array` (at `view`) and the digest recorded for it (kept in
        `records` for the next file of the block); None for the digest arrays themselves (their chunks'
        checksums are their check)."""
        if is_digests(array):
            return None
        owner, records = owner_of(array), {} if records is None else records
        if (owner, block) not in records:
            records[owner, block] = self.recorded(owner, block)
        recorded = records[owner, block][self.files(owner).index((array, view))]
        return Binding(array, block, view, self.writer(owner)), recorded.tobytes()

    def bind(self, owner: str | None, block: int, arrays: tuple[str, ...] | list[str] | None = None) -> None:
        """Record the digests of `block`'s shard files of `arrays` (default: all of `owner`'s) as they are on disk
        now; call right after writing them."""
        files = self.files(owner)
        digests = np.zeros((len(files), DIGEST_BYTES), np.uint8) if arrays is None else \
            self.recorded(owner, block, missing_ok=True).copy()
        writer = self.writer(owner)
        for i, (array, view) in enumerate(files):
            if arrays is None or array in arrays:
                data = self.store.location.read(self.store.shard_key(array, block, view))
                digests[i] = np.frombuffer(Binding(array, block, view, writer).digest(data), np.uint8)
        self.store.writable(digest_array(owner))[block] = digests
