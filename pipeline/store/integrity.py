"""Finding and repairing damaged shard files of a teacher store.

The quick check reads only each shard's index (the file's last bytes): the file is there,
is not empty, its index passes its crc32c checksum (a truncated file fails here, because
its last bytes are no longer the index) and every chunk lies inside the file. The full
check also decodes every chunk, which checks each chunk's own crc32c checksum.

The full check also checks that each file is the one written there (its binding digest,
pipeline.store.shards.Binding), so a file swapped with another or left from an earlier extraction
is found; the quick check cannot (it reads no file whole).

Repair deletes the damaged files and marks their blocks unfinished, for the teacher whose
array broke (for `valid` and the views' boxes and flips, every teacher), so that the `pipeline extract-teachers` command
that wrote the store recomputes exactly those blocks; it rewrites `labels` and `images`
from the data set when it opens the store. A block whose record of the shared arrays' digests
is damaged loses all its shared files, and every teacher recomputes it.
"""

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from pipeline.errors import PipelineError
from pipeline.store.layout import (DIGESTS, PROGRESS, SAMPLE_ARRAYS, field_of, owner_of, teacher_array,
                                   teacher_arrays)
from pipeline.store.shards import ShardDamage, check_index, decode_chunks, read_file
from pipeline.store.teacher_store import TeacherStore


@dataclass(frozen=True)
class Damage:
    array: str  # "labels", "teachers/<name>/cam", "teachers/<name>/progress", ...
    block: int
    what: str

    @property
    def teacher(self) -> str | None:
        return owner_of(self.array)

    def __str__(self) -> str:
        return f"{self.array} block {self.block}: {self.what}"


def shard_damage(store: TeacherStore, array: str, block: int, quick: bool) -> str | None:
    """What is wrong with `block` of `array` (the first damaged view's, for an array with views), or None."""
    layout, chunks = store.layout(array), range(store.block_chunks(array, block))
    for view, key in enumerate(store.shard_keys(array, block)):
        try:
            if quick:
                check_index(store.location, key, layout, chunks)
            else:
                decode_chunks(read_file(store.location, key, layout)[0], layout, chunks,
                              recorded_binding(store, array, block, view))
        except ShardDamage as damage:
            return f"{damage} (view {view})" if layout.views > 1 else str(damage)
    return None


def recorded_binding(store: TeacherStore, array: str, block: int, view: int):
    """The file's binding and recorded digest, or None where its digest record is itself damaged (reported as
    the damage of that record)."""
    try:
        return store.digests.bound(array, block, view)
    except PipelineError:
        return None


def sound_layout(store: TeacherStore, array: str) -> bool:
    """The array is there, laid out as the store's (N rows in shards of one block and the store's chunk
    rows: `TeacherStore.layout`); only then do its shard files have the names and index sizes that the
    checks below assume."""
    try:
        store.layout(array)
    except PipelineError:
        return False
    return True


def finished_marks(store: TeacherStore, name: str) -> tuple[np.ndarray, list[Damage]]:
    """The teacher's finished blocks, and its marks that do not decode (read as unfinished)."""
    store.teacher_group(name)  # a lost folder is no damaged mark: it fails here, and `verify` says so
    try:
        return store.progress(name), []
    except PipelineError:
        done, damage = np.zeros(store.num_blocks, bool), []
        for block in range(store.num_blocks):
            try:
                done[block] = store.progress(name, block)
            except PipelineError:
                damage.append(Damage(teacher_array(name, PROGRESS), block, "finished mark does not decode"))
        return done, damage


def find_damage(store: TeacherStore, quick: bool = False) -> list[Damage]:
    """Every damaged block of every array: shared arrays in all blocks, a teacher's in its finished ones."""
    checks = [(array, block) for array in (*store.shared_arrays, DIGESTS) if sound_layout(store, array)
              for block in range(store.num_blocks)]
    damage = []
    for name in store.teachers:
        try:
            done, bad_marks = finished_marks(store, name)
        except PipelineError:  # its folder is gone: `verify` says so
            continue
        damage += bad_marks
        arrays = teacher_arrays([name], (*store.teacher_fields, DIGESTS))
        checks += [(array, int(block)) for block in np.flatnonzero(done) for array in arrays
                   if sound_layout(store, array)]  # `verify` reports the others
    for array, block in tqdm(checks, desc="verify " + ("shard files" if quick else "every chunk"), unit="shard",
                             disable=len(checks) < 200):
        what = shard_damage(store, array, block, quick)
        if what:
            damage.append(Damage(array, block, what))
    return damage


def repair_damage(store: TeacherStore, damage: list[Damage]) -> None:
    """Delete the damaged files and unmark their blocks (see the module's docstring)."""
    for item in damage:
        lost = [item.array] if field_of(item.array) != PROGRESS else []  # a mark is not sharded: unmarking
        if item.array == DIGESTS:  # rewrites it; the shared files' digests lost: their files are rewritten
            lost += store.shared_arrays
        for array in lost:
            for key in store.shard_keys(array, item.block):
                store.location.delete(key)
        teachers = [item.teacher] if item.teacher else store.teachers if item.array in (*SAMPLE_ARRAYS, DIGESTS) else []
        for name in teachers:
            store.unmark(name, item.block)
