"""The store's sharded arrays: created by zarr (`create_sharded`), read directly here: one read per file, every
checksum checked.

zarr's read path has a fixed cost per chunk (its asyncio codec pipeline) that caps stage two's
reading however the reads are batched (docs/reader.md has the figures). Every sharded array of a store has one layout, which
`ShardLayout.of` checks: a shard is one block of rows (of one view, for arrays with a view
axis after the row axis) in chunks of `chunk_rows` rows, each
chunk blosc-compressed and followed by its crc32c; the file ends in the index, an (offset,
length) pair of little-endian uint64 per chunk, and the index's own crc32c (the zarr v3
sharding codec with index_location "end"). Writing stays with zarr.
"""

import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import google_crc32c
import numpy as np
import zarr
from numcodecs import blosc
from zarr.codecs import BloscCodec, Crc32cCodec

from pipeline.errors import PipelineError
from pipeline.store.layout import FORMAT, VERSION

if TYPE_CHECKING:
    from pipeline.store.location import Location

INDEX_ENTRY_BYTES, CHECKSUM_BYTES, BLOSC_HEADER_BYTES = 16, 4, 16
DIGEST_BYTES = 16  # of a shard file's binding digest (SHA-256, its first 16 bytes)
EMPTY = np.uint64(2**64 - 1)  # the index entry of a chunk that was never written


class ShardDamage(Exception):
    """What is wrong with one shard file, in a few words (the caller names the store and block)."""


@dataclass(frozen=True)
class ShardLayout:
    dtype: np.dtype  # little-endian, as stored
    row_shape: tuple[int, ...]  # of one row of one view
    rows: int  # of the whole array
    shard_rows: int
    chunk_rows: int
    views: int = 0  # the length of the view axis; 0: the array has none

    @classmethod
    def of(cls, metadata: dict, name: str, viewed: bool) -> "ShardLayout":
        """The layout that an array's zarr.json describes (`viewed`: with a view axis, each view of a
        block in its own shard), or a one-line error if it is not this format's (read as JSON: opening
        the array with zarr costs milliseconds, at every reader's start)."""
        try:
            layout = cls.parse(metadata, viewed)
        except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError):
            layout = None
        if layout is None:
            raise PipelineError(f"array {name} is not laid out as a {FORMAT} v{VERSION} array; rewrite the store with "
                                "this version's `pipeline extract-teachers`")
        return layout

    @classmethod
    def parse(cls, metadata: dict, viewed: bool) -> "ShardLayout | None":
        (sharding,) = metadata["codecs"]
        config, dtype = sharding["configuration"], np.dtype(metadata["data_type"])
        inner, index = config["codecs"], config["index_codecs"]
        shape, shard, chunk = metadata["shape"], metadata["chunk_grid"]["configuration"]["chunk_shape"], \
            config["chunk_shape"]
        little = lambda codec: codec.get("configuration", {}).get("endian") == "little"  # noqa: E731
        sound = (sharding["name"] == "sharding_indexed" and config.get("index_location") == "end"
                 and [c["name"] for c in inner] == ["bytes", "blosc", "crc32c"] and (dtype.itemsize == 1 or little(inner[0]))
                 and [c["name"] for c in index] == ["bytes", "crc32c"] and little(index[0])
                 and shard[1 + viewed:] == chunk[1 + viewed:] == shape[1 + viewed:] and shard[0] % chunk[0] == 0
                 and (not viewed or shard[1] == chunk[1] == 1)
                 and metadata["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}})
        views = shape[1] if viewed else 0
        return cls(dtype.newbyteorder("<"), tuple(shape[1 + viewed:]), shape[0], shard[0], chunk[0], views) \
            if sound else None

    @property
    def chunks_per_shard(self) -> int:
        return self.shard_rows // self.chunk_rows

    def shard_key(self, block: int, view: int = 0) -> str:
        """The shard file of `block` (and `view`), under the array's folder (zarr's default chunk key encoding)."""
        return "/".join(["c", str(block), *([str(view)] if self.views else []), *["0"] * len(self.row_shape)])

    @property
    def index_bytes(self) -> int:
        return INDEX_ENTRY_BYTES * self.chunks_per_shard + CHECKSUM_BYTES

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_rows * math.prod(self.row_shape) * self.dtype.itemsize


def has_checksum(data: np.ndarray) -> bool:
    """Whether the bytes `data` end in the crc32c of the bytes before them (zarr's Crc32cCodec: little-endian)."""
    body, stored = data[:-CHECKSUM_BYTES], data[-CHECKSUM_BYTES:]
    return google_crc32c.value(body) == int.from_bytes(stored.tobytes(), "little")


def blosc_sizes(body: np.ndarray) -> tuple[int, int]:
    """(decoded, compressed) bytes that a blosc chunk's 16-byte header states (both uint32 LE)."""
    if len(body) < BLOSC_HEADER_BYTES:
        return 0, len(body)
    return int(body[4:8].view("<u4")[0]), int(body[12:16].view("<u4")[0])


@dataclass(frozen=True)
class Binding:
    """Where a shard file belongs: its array path, block and view, and the fingerprint of what wrote it (a
    teacher, or the store for its shared arrays). The digest recorded when it was written covers these and
    the file's bytes, so a file swapped with another, or left from an earlier extraction, fails it."""

    array: str
    block: int
    view: int
    writer: str

    def digest(self, data: bytes | np.ndarray) -> bytes:
        digest = hashlib.sha256(f"{self.array}\0{self.block}\0{self.view}\0{self.writer}\0".encode())
        digest.update(data)  # SHA-256: twice BLAKE2b's speed where the CPU has SHA instructions
        return digest.digest()[:DIGEST_BYTES]


def read_file(where: "Location", key: str, layout: ShardLayout, index_only: bool = False) -> tuple[np.ndarray, int]:
    """The shard file's bytes (with `index_only`, just its index: the last bytes) and its size; one read of
    the file or object `key` of the store at `where`."""
    try:
        if index_only:
            data, size = where.read_tail(key, layout.index_bytes)
        else:
            data = where.read(key)
            size = len(data)
    except FileNotFoundError:
        raise ShardDamage("its shard file is missing") from None
    check_size(size, layout)
    return np.frombuffer(data, np.uint8), size


def check_size(size: int, layout: ShardLayout) -> None:
    if size == 0:
        raise ShardDamage("its shard file is empty")
    if size < layout.index_bytes:
        raise ShardDamage("its shard file is truncated (shorter than its index)")


def chunk_spans(index: np.ndarray, data_bytes: int, layout: ShardLayout, chunks: range) -> np.ndarray:
    """(offset, length) of each chunk in `chunks`, after checking the index (the file's last
    `index_bytes`) and that the chunks lie in the `data_bytes` before it."""
    if not has_checksum(index):
        raise ShardDamage("its shard index fails its checksum (truncated or damaged)")
    if chunks.stop > layout.chunks_per_shard:  # a slice past the index would silently return fewer entries
        raise ShardDamage(f"chunks up to {chunks.stop} asked of a shard of {layout.chunks_per_shard}")
    entries = index[:-CHECKSUM_BYTES].view("<u8").reshape(-1, 2)[chunks.start:chunks.stop]
    if (entries == EMPTY).any():
        raise ShardDamage("a chunk is missing from its shard")
    offsets, lengths = entries[:, 0], entries[:, 1]
    if ((offsets > data_bytes) | (lengths > data_bytes - np.minimum(offsets, data_bytes))).any():  # no uint64 wrap
        raise ShardDamage("its shard file is truncated (a chunk reaches past the data)")
    return entries


def check_index(where: "Location", key: str, layout: ShardLayout, chunks: range) -> None:
    """The quick check: the file is there and its index is sound, read from the file's end only."""
    index, size = read_file(where, key, layout, index_only=True)
    chunk_spans(index, size - layout.index_bytes, layout, chunks)


def decode_chunks(data: np.ndarray, layout: ShardLayout, chunks: range,
                  bound: tuple[Binding, bytes] | None = None) -> np.ndarray:
    """The rows of `chunks` (chunk numbers within the shard) of the shard file's bytes `data`, every checksum
    checked; with `bound` (the file's binding and the digest recorded for it), also that the file is the one
    written there (last: a damaged file is reported as damaged, a sound one in the wrong place as misplaced)."""
    check_size(len(data), layout)
    data_bytes = len(data) - layout.index_bytes
    out = np.empty((len(chunks) * layout.chunk_rows, *layout.row_shape), layout.dtype)
    target = out.reshape(len(chunks), -1).view(np.uint8)
    for i, (offset, length) in enumerate(chunk_spans(data[data_bytes:], data_bytes, layout, chunks)):
        chunk = data[offset:offset + length]
        if length <= CHECKSUM_BYTES or not has_checksum(chunk):
            raise ShardDamage("it does not decode (checksum mismatch)")
        body = chunk[:-CHECKSUM_BYTES]
        decoded, compressed = blosc_sizes(body)
        if (decoded, compressed) != (layout.chunk_bytes, len(body)):
            raise ShardDamage(f"it does not decode (a chunk says it holds {decoded} bytes in {compressed}, "
                              f"not {layout.chunk_bytes} in {len(body)})")
        try:
            blosc.decompress(body, target[i])
        except RuntimeError as error:  # blosc's own checks of its header and stream
            raise ShardDamage(f"it does not decode ({error})") from None
    if bound is not None:
        check_binding(data, *bound)
    return out


def check_binding(data: np.ndarray, binding: Binding, recorded: bytes) -> None:
    if not any(recorded):
        raise ShardDamage("no digest was recorded for its shard file (its block was never finished)")
    if binding.digest(data) != recorded:
        raise ShardDamage("its shard file is not the one written there (moved from another block, view or array, "
                          "or left from an earlier extraction)")


def shard_rows(data: np.ndarray, layout: ShardLayout, start: int, stop: int,
               bound: tuple[Binding, bytes] | None = None) -> np.ndarray:
    """Rows [start, stop) of one shard file's bytes `data`, counted from the shard's first row (`bound`: see
    `decode_chunks`)."""
    first, last = start // layout.chunk_rows, -(-stop // layout.chunk_rows)
    rows = decode_chunks(data, layout, range(first, last), bound)
    offset = first * layout.chunk_rows
    return rows[start - offset:stop - offset]


def compressors() -> tuple:
    """Each chunk is compressed, then checksummed: a flipped bit fails its read."""
    return BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle"), Crc32cCodec()


# zarr leaves out chunks equal to the fill value; here every chunk is written, so a missing one is damage
WRITE_EVERY_CHUNK = {"write_empty_chunks": True}


def create_sharded(group: zarr.Group, name: str, shape: tuple, dtype, block_size: int, chunk: int,
                   viewed: bool) -> zarr.Array:
    """An array of one shard file per block (and per view, when `viewed`: axis 1 is the view), chunks of
    `chunk` rows, every chunk checksummed and written."""
    inner = (1, *shape[2:]) if viewed else tuple(shape[1:])
    return group.create_array(name, shape=shape, dtype=dtype, chunks=(chunk, *inner), shards=(block_size, *inner),
                              compressors=compressors(), fill_value=0, config=WRITE_EVERY_CHUNK)
