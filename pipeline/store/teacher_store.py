"""A teacher store's reading and writing: one Zarr v3 group per data set split (pipeline.store.layout).

Rows are sharded along N; a *block* is the unit of writing, so no two writers ever touch
one shard and a block is marked done in `progress` only after its data is written (a
killed run resumes with the unmarked blocks). Every teacher array, and the views' boxes
and flips, have a view axis after the row axis (pipeline.views), with one shard file per
block and view, so that a student reads only the view it uses.

Every chunk ends in a crc32c checksum (and so does every shard's index), and every chunk
is written even when it holds only zeros, so a damaged chunk fails to decode and an
absent shard file of a finished block is damage, never zarr's fill value. Every shard file
is bound to its place by a recorded digest (pipeline.store.digests), so a file moved to another
place or left from an earlier extraction is damage too. zarr's own codecs are untouched: plain
zarr still reads the store.
"""

import json
import math
from functools import cached_property
from pathlib import Path

import numpy as np
import zarr

from pipeline import __version__
from pipeline.errors import PipelineError
from pipeline.store.cache import ShardCache
from pipeline.store.digests import ShardDigests
from pipeline.store.layout import (EXTRACTION_VERSION, FORMAT, FORMER_FORMATS, PROGRESS, SAMPLE_ARRAYS, SCORE_FIELDS,
                                   SHARED_ARRAYS, STORE_IDENTITY, TEACHER_IDENTITY, TEACHERS, TOPK_FIELDS, VERSION,
                                   VIEWED_SHARED, fingerprint, is_digests, is_viewed, owner_of, teacher_array)
from pipeline.store.location import Location, StoreUnreachable, location
from pipeline.store.shards import (DIGEST_BYTES, WRITE_EVERY_CHUNK, ShardDamage, ShardLayout, compressors, create_sharded,
                                   read_file, shard_rows)
from pipeline.views import ViewPolicy

MAX_STORED_IMAGE_SIDE = 64  # larger images are read from the data set, not the store


BLOCK_SIZES, MIN_BLOCKS = (256, 1024, 4096, 16384), 32


def default_block_size(samples: int) -> int:
    """The largest block size that still gives `MIN_BLOCKS` blocks to shuffle and share among loader
    workers: stage two reads larger blocks faster (docs/reader.md has the figures), so an ImageNet store gets
    16,384 and digits 256."""
    return max(size for size in BLOCK_SIZES if size == BLOCK_SIZES[0] or samples // size >= MIN_BLOCKS)


def stores_images(images: np.ndarray | None) -> bool:
    return images is not None and max(images.shape[1:3]) <= MAX_STORED_IMAGE_SIDE


def view_shapes(samples: int, views: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shape and dtype of the views' arrays: each view's box (x0, y0, x1, y1) and flip."""
    return {"view_boxes": ((samples, views, 4), "int32"), "view_flips": ((samples, views), "bool")}


def _short(value):
    """Hashes in messages: the first 12 hex digits tell two apart."""
    return value[:12] + "..." if isinstance(value, str) and len(value) == 64 else value


class TeacherStore:
    """Read and write access to one teacher store; construct with `create` or `open`."""

    def __init__(self, group: zarr.Group, path: "str | Path | Location", cache: ShardCache | None = None):
        self.group, self.location = group, location(path)  # a folder or a bucket's prefix; str(): as given
        self.cache = cache  # fetched shard files kept on local disk (`--cache-dir`)
        self._layouts: dict[str, ShardLayout] = {}
        self.digests = ShardDigests(self)

    # -- opening -----------------------------------------------------------------------

    @classmethod
    def open(cls, path: "str | Path | Location", mode: str = "r", cache: ShardCache | None = None) -> "TeacherStore":
        """The store at `path` (a folder or URL), with `cache` keeping the shard files it reads."""
        path = location(path)
        if not path.exists("zarr.json"):
            raise PipelineError(f"no teacher store at {path}; write one with `pipeline extract-teachers`")
        group = zarr.open_group(path.zarr_store(read_only=mode == "r"), mode=mode)
        found = (group.attrs.get("format"), group.attrs.get("version"))
        if found != (FORMAT, VERSION):
            raise PipelineError(
                f"{path} is not a {FORMAT} v{VERSION} store (format={found[0]!r}, version={found[1]!r}); "
                "rewrite it with this version's `pipeline extract-teachers` and --on-change replace"
            )
        if "fingerprint" not in group.attrs:
            raise PipelineError(f"store {path} was interrupted while being created; rerun `pipeline extract-teachers`")
        return cls(group, path, cache)

    @staticmethod
    def locked(path: "str | Path | Location"):
        """Serialise store creation and teacher registration between processes (a folder: flock on its parent)."""
        return location(path).locked()

    @classmethod
    def create(
        cls, path: "str | Path | Location", identity: dict, labels: np.ndarray, images: np.ndarray | None,
        target: str, block_size: int, logits: dict | None = None, chunks_per_block: int = 4,
        replace: bool = False, views: ViewPolicy = ViewPolicy(),
    ) -> "TeacherStore":
        """Open the store at `path` if it was made from the same data, else create it (with
        `replace`, a store made from other data or settings is deleted and created anew).

        `format` is written first and `fingerprint` last, so a creation that was killed half
        way is recognisable as ours and is simply redone; call inside `locked(path)`.
        """
        path = location(path)
        record = cls.record(identity, target, block_size, logits, views)
        if path.exists("zarr.json"):
            found = zarr.open_group(path.zarr_store(read_only=True), mode="r").attrs
            ours = found.get("format") in (FORMAT, *FORMER_FORMATS)
            if not (found.get("format") == FORMAT and "fingerprint" not in found):
                try:
                    store = cls.open(path, mode="r+")
                    store.check_made_from(record)
                    store.restore_missing_rows(labels, images)
                    return store
                except PipelineError as error:
                    if not (replace and ours):  # never delete what is not ours
                        raise
                    print(f"replacing {path}: {error}")
                    path.delete_all()
        if block_size % chunks_per_block:
            raise PipelineError(f"block size {block_size} is not a multiple of {chunks_per_block} chunks per block")
        group = zarr.open_group(path.zarr_store(read_only=False), mode="w")
        group.attrs.update({"format": FORMAT, "version": VERSION})
        n, chunk = len(labels), block_size // chunks_per_block
        cls._create_rows(group, "labels", labels.astype(np.int32), block_size, chunk)
        if stores_images(images):
            cls._create_rows(group, "images", images.astype(np.uint8), block_size, chunk)
        cls._create_rows(group, "valid", np.ones(n, dtype=bool), block_size, chunk)
        for name, (shape, dtype) in view_shapes(n, views.count).items():
            cls._create_rows(group, name, np.zeros(shape, dtype), block_size, chunk, viewed=True)
        group.create_group(TEACHERS)
        group.attrs.update({**record, "chunk_rows": chunk, "num_blocks": -(-n // block_size), "code_version": __version__,
                            "stores_images": "images" in group, "teachers": []})
        store = cls(group, path)
        store.digests.create(group, None)
        for block in range(store.num_blocks):
            store.digests.bind(None, block)
        group.attrs["fingerprint"] = fingerprint(record)  # last: the store is complete
        return store

    @staticmethod
    def record(identity: dict, target: str, block_size: int, logits: dict | None, views: ViewPolicy) -> dict:
        """What a store is made from (STORE_IDENTITY): its fingerprint's input, checked on every reopening."""
        return dict(zip(STORE_IDENTITY, (identity, target, block_size, logits or {"mode": "full"}, views.as_dict(),
                                         EXTRACTION_VERSION)))

    @staticmethod
    def _create_rows(group: zarr.Group, name: str, data: np.ndarray, block_size: int, chunk: int,
                     viewed: bool = False) -> None:
        rows = create_sharded(group, name, data.shape, data.dtype, block_size, chunk, viewed)
        rows[...] = data

    def restore_missing_rows(self, labels: np.ndarray, images: np.ndarray | None) -> None:
        """Rewrite the `labels` and `images` shards that a repair deleted or that fail their reads (a write killed
        before its digest was recorded), or the whole array, if it was lost, from the data set."""
        for name, data in (("labels", labels.astype(np.int32)), ("images", images)):
            if name not in self.shared_arrays:
                continue
            if name not in self.group:
                print(f"restoring the lost array {name} of {self.location} from the data set")
                self._create_rows(self.group, name, data, self.block_size, self.attrs["chunk_rows"])
                for block in range(self.num_blocks):
                    self.digests.bind(None, block, [name])
                continue
            for block in range(self.num_blocks):
                if not self.readable(name, block):
                    print(f"restoring {name} block {block} of {self.location} from the data set")
                    start, stop = self.block_rows(block)
                    self.writable(name)[start:stop] = data[start:stop].astype(self.layout(name).dtype)
                    self.digests.bind(None, block, [name])

    def check_holds(self, dataset: dict) -> None:
        """Fail unless the store was made from `dataset` (its identity) by this code's extraction version: a reader
        never mixes values of another extraction with what it computes itself (views rendered from image files)."""
        self.check_made_from({"dataset": dataset, "extraction_version": EXTRACTION_VERSION})

    def check_made_from(self, record: dict) -> None:
        """Fail with the first difference between this store and what the caller expects."""
        for key, wanted in record.items():
            have = self.attrs.get(key)
            if isinstance(wanted, dict):
                diff = [k for k in wanted if have is None or have.get(k) != wanted[k]]
                if diff:
                    k = diff[0]
                    hint = " (other samples or labels: check --split-seed and --data-root)" if k == "ids_sha256" else ""
                    raise PipelineError(
                        f"store {self.location} was made from {key}.{k}={_short((have or {}).get(k))!r}, "
                        f"not {_short(wanted[k])!r}{hint}; use a new --store path, the matching data, or "
                        "--on-change replace to rebuild it"
                    )
            elif have != wanted:
                raise PipelineError(f"store {self.location} has {key}={have!r}, not {wanted!r}; use a new --store path, "
                                    "or rebuild it with its `pipeline extract-teachers` command and --on-change replace")

    # -- layout --------------------------------------------------------------------------

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @property
    def shared_arrays(self) -> tuple[str, ...]:
        """The arrays this store must hold besides its teachers'."""
        return tuple(a for a in SHARED_ARRAYS if a != "images" or self.attrs["stores_images"])

    @cached_property  # fixed when the store is created
    def num_samples(self) -> int:
        return self.attrs["dataset"]["num_samples"]

    @cached_property  # fixed when the store is created
    def block_size(self) -> int:
        return self.attrs["block_size"]

    @cached_property  # fixed when the store is created
    def num_blocks(self) -> int:
        return self.attrs["num_blocks"]

    @cached_property  # fixed when the store is created
    def num_views(self) -> int:
        return self.attrs["views"]["count"]

    def block_rows(self, block: int) -> tuple[int, int]:
        start = block * self.block_size
        return start, min(start + self.block_size, self.num_samples)

    @property
    def teachers(self) -> list[str]:
        """The registered teachers (a root attribute: a teacher whose folder was lost is noticed)."""
        return sorted(self.attrs.get("teachers", []))

    def teacher_attrs(self, name: str) -> dict:
        return dict(self.teacher_group(name).attrs)

    def teacher_group(self, name: str) -> zarr.Group:
        if name not in self.teachers:
            raise PipelineError(
                f"store {self.location} has no teacher {name!r}; it holds: {', '.join(self.teachers) or 'none'}"
            )
        if name not in self.group[TEACHERS].group_keys():
            raise PipelineError(f"store {self.location} is damaged: teacher {name!r} is registered but its folder "
                                f"{TEACHERS}/{name} is gone; run `pipeline store drop-teacher {self.location} {name}`, "
                                "then the `pipeline extract-teachers` command that wrote it")
        return self.group[TEACHERS][name]

    @property
    def logits_mode(self) -> dict:
        return self.attrs["logits"]

    @property
    def logit_fields(self) -> tuple[str, ...]:
        return TOPK_FIELDS if self.logits_mode["mode"] == "topk" else ("logits",)

    @property
    def teacher_fields(self) -> tuple[str, ...]:
        return self.logit_fields + SCORE_FIELDS

    def teacher_shapes(self, map_shape) -> dict[str, tuple[tuple[int, ...], str]]:
        """Shape and dtype of each array of a teacher whose maps are `map_shape`."""
        n, classes = (self.num_samples, self.num_views), self.attrs["dataset"]["num_classes"]
        mode = self.logits_mode
        class_dtype = "int16" if classes <= 2**15 else "int32"
        logits = {"logits": ((*n, classes), "float16")} if mode["mode"] == "full" else {
            "logits": ((*n, mode["k"]), "float16"),
            "logit_classes": ((*n, mode["k"]), class_dtype),
            "tail_logsumexp": (n, "float32"),
        }
        return logits | {"cam": ((*n, *map_shape), "uint8"), "cam_max": (n, "float32"), "cam_class": (n, class_dtype),
                         "y_prob": (n, "float32"), "o_prob": (n, "float32"),
                         "attention": ((*n, *map_shape), "uint8"), "attention_max": (n, "float32")}

    # -- writing -------------------------------------------------------------------------

    def holds(self, name: str, identity: dict) -> bool:
        """Whether teacher `name` is registered, and with this identity."""
        return name in self.teachers and \
            self.teacher_attrs(name).get("fingerprint") == fingerprint({k: identity.get(k) for k in TEACHER_IDENTITY})

    def check_teacher(self, name: str, identity: dict, replace: bool = False) -> str | None:
        """For a teacher the store does not hold with this identity: None where `name` is unregistered, else
        what differs, as a sentence, which stops the run unless `replace`."""
        if name not in self.teachers:
            return None
        have = self.teacher_attrs(name)
        changed = [k for k in TEACHER_IDENTITY if have.get(k) != identity.get(k)]
        message = f"store {self.location} already holds a different teacher {name!r} (differs in: {', '.join(changed)})"
        if not replace:
            raise PipelineError(f"{message}; drop it from the store, write a new --store, or pass "
                                "--on-change replace to recompute it")
        return message

    def add_teacher(self, name: str, identity: dict, replace: bool = False) -> None:
        """Create the teacher's arrays (`identity["map_shape"]` sized), or check that the existing
        ones came from the same teacher (with `replace`, another teacher's arrays are dropped)."""
        map_shape = identity["map_shape"]
        if self.holds(name, identity):
            return
        changed = self.check_teacher(name, identity, replace)
        if changed:
            print(f"{changed}: recomputing it")
            self.drop_teacher(name)
        identity = {**identity, "fingerprint": fingerprint({k: identity.get(k) for k in TEACHER_IDENTITY})}
        if name not in self.teachers and name in self.group[TEACHERS].group_keys():
            del self.group[TEACHERS][name]  # its registration was interrupted before any block was written
        group = self.group[TEACHERS].create_group(name)
        chunk, block = self.attrs["chunk_rows"], self.block_size
        for field, (shape, dtype) in self.teacher_shapes(map_shape).items():
            create_sharded(group, field, shape, dtype, block, chunk, viewed=True)
        group.create_array(PROGRESS, shape=(self.num_blocks,), dtype="bool", chunks=(1,), fill_value=False,
                           compressors=compressors())  # an absent mark is "not finished": the block is recomputed
        self.digests.create(group, name)
        group.attrs.update(identity)
        self.group.attrs["teachers"] = sorted({*self.teachers, name})  # registered last: complete now
        self.forget_layouts()

    def drop_teacher(self, name: str) -> None:
        """Unregister one teacher and delete its arrays (if still there); the other teachers are untouched."""
        if name not in self.teachers:
            self.teacher_group(name)  # fails listing the store's teachers
        self.group.attrs["teachers"] = [t for t in self.teachers if t != name]
        if name in self.group[TEACHERS].group_keys():
            del self.group[TEACHERS][name]
        self.forget_layouts()

    def forget_layouts(self) -> None:
        """Drop what was read about the arrays and their writers (a teacher was added, dropped or replaced)."""
        self._layouts = {}
        self.digests.forget()

    def writable(self, array: str) -> zarr.Array:
        return self.group[array].with_config(WRITE_EVERY_CHUNK)

    def progress(self, name: str, block: int | None = None) -> np.ndarray:
        """Which blocks teacher `name` has finished (or whether it finished `block`); a damaged mark
        stops with the repair command."""
        marks = self.teacher_group(name)[PROGRESS]
        try:
            return marks[... if block is None else block]
        except Exception as error:
            raise self.damaged(teacher_array(name, PROGRESS), None, error) from None

    def unmark(self, name: str, block: int) -> None:
        """Mark `block` of teacher `name` unfinished: the next extraction recomputes it."""
        self.teacher_group(name)[PROGRESS][block] = False

    def pending_blocks(self, name: str) -> list[int]:
        return [int(b) for b in np.flatnonzero(~self.progress(name))]

    def write_block(self, name: str, block: int, arrays: dict[str, np.ndarray]) -> None:
        """Write one whole block (rows, views, ...) of every teacher field, then mark the block finished."""
        group = self.teacher_group(name)
        start, stop = self.block_rows(block)
        for field in self.teacher_fields:
            data = arrays[field]
            if data.shape[1:] != group[field].shape[1:] or len(data) != stop - start:
                raise ValueError(f"block {block} of {name}/{field} has shape {data.shape}, "
                                 f"expected ({stop - start}, {', '.join(map(str, group[field].shape[1:]))})")
            self.writable(teacher_array(name, field))[start:stop] = data.astype(group[field].dtype, copy=False)
        self.digests.bind(name, block)
        group[PROGRESS][block] = True

    def write_samples(self, block: int, arrays: dict[str, np.ndarray]) -> None:
        """A block's `valid` (which rows hold a readable image) and its views' boxes and flips (SAMPLE_ARRAYS);
        written before the first teacher marks the block, and only checked afterwards (teachers added
        later must see the same images and views)."""
        start, stop = self.block_rows(block)
        if not any(self.progress(name, block) for name in self.teachers):
            for name in SAMPLE_ARRAYS:
                self.writable(name)[start:stop] = arrays[name]
            self.digests.bind(None, block, SAMPLE_ARRAYS)
            return
        for name, view in [("valid", None), *((name, v) for v in range(self.num_views) for name in VIEWED_SHARED)]:
            have = self.read_rows(start, stop, [name], view or 0)[name]  # each array (and view) read once
            now = arrays[name] if view is None else arrays[name][:, view]
            changed = np.flatnonzero((have != now).reshape(len(now), -1).any(1))
            if len(changed):
                what = (f"was {'un' if now[changed[0]] else ''}readable" if view is None else
                        f"had another view {view} ({name}; has the image changed size?)")
                raise PipelineError(f"row {start + changed[0]} of {self.location} {what} when other teachers were "
                                    "extracted; restore the image file as it was, or write a new --store")

    # -- reading -------------------------------------------------------------------------

    def finished_blocks(self, teachers: list[str]) -> list[int]:
        """Blocks that every one of `teachers` has finished."""
        done = np.ones(self.num_blocks, dtype=bool)
        for name in teachers:
            done &= self.progress(name)
        return [int(b) for b in np.flatnonzero(done)]

    def read_rows(self, start: int, stop: int, fields: list[str], view: int = 0) -> dict[str, np.ndarray]:
        """Rows [start, stop) of each array path, e.g. "labels" or "teachers/resnet20/cam", arrays with a
        view axis at `view` (view 0: the eval view); a missing shard file or a chunk that fails its
        checksum stops with the repair command."""
        if not 0 <= view < self.num_views:
            raise ValueError(f"view {view} asked of store {self.location}, which has {self.num_views} view(s)")
        spans = [(block, max(start, first), min(stop, last)) for block in range(start // self.block_size,
                                                                                -(-stop // self.block_size))
                 for first, last in [self.block_rows(block)]]
        owners = list(dict.fromkeys((owner_of(field), block) for field in fields if not is_digests(field)
                                    for block, _, _ in spans))
        records = dict(zip(owners, self.location.map(lambda owner: self.digests.recorded(*owner), owners)))
        parts = self.location.map(lambda task: self.read_block_rows(task[0], *task[1], view, records),
                                  [(field, span) for field in fields for span in spans])  # a bucket: all at once
        return {field: np.concatenate(parts[i * len(spans):(i + 1) * len(spans)]) for i, field in enumerate(fields)}

    def read_block_rows(self, field: str, block: int, start: int, stop: int, view: int = 0,
                        records: dict | None = None) -> np.ndarray:
        """Rows [start, stop) of `field` (at `view`), all in `block`, read straight from its shard file
        (pipeline.store.shards) and checked to be the file written there (`records`: digests already read)."""
        first, layout = block * self.block_size, self.layout(field)
        bound = self.digests.bound(field, block, view if is_viewed(field) else 0, records)
        key = self.shard_key(field, block, view)
        name = bound[1].hex() if self.cache is not None and bound is not None else None
        try:
            cached = self.cache.get(name) if name else None
            if cached is not None:
                try:
                    return shard_rows(np.frombuffer(cached, np.uint8), layout, start - first, stop - first, bound)
                except ShardDamage:  # the local copy is damaged, not the store: fetch it again
                    self.cache.drop(name)
            data = read_file(self.location, key, layout)[0]
            rows = shard_rows(data, layout, start - first, stop - first, bound)
            if name:
                self.cache.put(name, data.tobytes())
            return rows
        except ShardDamage as damage:
            where = f" (view {view})" if is_viewed(field) and self.num_views > 1 else ""
            raise self.damaged(field, block, f"{damage}{where}") from None

    def layout(self, path: str) -> ShardLayout:
        """How `path`'s shard files are laid out, checked against the store's rows, blocks and chunks."""
        if path not in self._layouts:
            try:
                metadata = json.loads(self.location.read(f"{path}/zarr.json"))
            except FileNotFoundError:
                raise self.damaged(path, None, "its array metadata (zarr.json) is missing") from None
            except ValueError:
                raise self.damaged(path, None, "its array metadata (zarr.json) is not JSON") from None
            layout = ShardLayout.of(metadata, path, is_viewed(path))
            found = (layout.rows, layout.shard_rows, layout.chunk_rows, layout.views)
            if is_digests(path):  # one row of digests per block
                files = len(self.digests.files(owner_of(path)))
                if found + layout.row_shape != (self.num_blocks, 1, 1, 0, files, DIGEST_BYTES):
                    raise self.damaged(path, None, f"its zarr.json describes {layout.rows} rows of {layout.row_shape} "
                                                   f"in shards of {layout.shard_rows}, not {self.num_blocks} rows of "
                                                   f"({files}, {DIGEST_BYTES}) in shards of 1")
            else:
                expected = (self.num_samples, self.block_size, self.attrs["chunk_rows"],
                            self.num_views if is_viewed(path) else 0)
                if found != expected:
                    raise self.damaged(path, None, "its zarr.json describes {} rows in shards of {}, chunks of {} and "
                                                   "{} views, not {}, {}, {} and {}".format(*found, *expected))
            self._layouts[path] = layout
        return self._layouts[path]

    def shard_key(self, array: str, block: int, view: int = 0) -> str:
        """The shard file (object) that holds `block` (at `view`, for an array with a view axis) of `array`, under
        the store's root."""
        return f"{array}/{self.layout(array).shard_key(block, view)}"

    def shard_keys(self, array: str, block: int) -> list[str]:
        """Every shard file that holds part of `block` of `array`: one per view for an array with a view axis."""
        return [self.shard_key(array, block, view) for view in range(max(1, self.layout(array).views))]

    def readable(self, array: str, block: int) -> bool:
        """Whether `block` of `array` reads: its file there, sound and bound to its place."""
        start = self.block_rows(block)[0]
        try:
            self.read_block_rows(array, block, start, start + 1)
        except StoreUnreachable:
            raise
        except PipelineError:
            return False
        return True

    def block_chunks(self, array: str, block: int) -> int:
        """How many chunks `block` of `array` holds (a digest array: one)."""
        start, stop = (0, 1) if is_digests(array) else self.block_rows(block)
        return math.ceil((stop - start) / self.layout(array).chunk_rows)

    def damaged(self, array: str, block: int | None, what: str | Exception) -> PipelineError:
        """The one-line error for damage found while reading (`what`: a text or the decoding error)."""
        where = f"{array}" + (f" block {block}" if block is not None else "")
        what = what if isinstance(what, str) else f"it does not decode ({decoding_error(what)})"
        return PipelineError(
            f"store {self.location} is damaged: {where}: {what}; run `pipeline store verify --repair {self.location}`, "
            "then the `pipeline extract-teachers` command that wrote it"
        )


def decoding_error(error: Exception) -> str:
    """What a failed chunk read says, in a few words (zarr's crc32c codec: "checksum do not match")."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return "checksum mismatch" if "checksum" in text else text[:80]
