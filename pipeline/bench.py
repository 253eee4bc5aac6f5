"""`python -m pipeline.bench`: what the store's safety costs, measured as ratios in one run.

Stores are synthetic (random values of the real shapes and dtypes), written to a temporary
folder; each rate is the median of `repeats` timed passes after one warm-up pass.
"""

import contextlib
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import click
import numpy as np

from pipeline import cache
from pipeline.cache import TeacherStore
from pipeline.distill import teacher_fields
from pipeline.stream import BlockStream


def synthetic_store(path: Path, samples: int, classes: int, map_side: int, teachers: int, block_size: int,
                    image_side: int = 8) -> TeacherStore:
    """A complete store of random values: `teachers` teachers, full logits, maps of map_side^2."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, classes, samples)
    images = rng.integers(0, 256, (samples, image_side, image_side, 1), dtype=np.uint8)
    identity = {"name": "synthetic", "split": "train", "num_samples": samples, "num_classes": classes,
                "image_shape": [image_side, image_side, 1], "ids_sha256": "0" * 64}
    store = TeacherStore.create(path, identity, labels, images, target="label", block_size=block_size)
    for t in range(teachers):
        store.add_teacher(f"t{t}", {"arch": "synthetic", "weights_sha256": str(t), "target_layer": "x",
                                    "transform": {}, "code_sha256": "", "map_shape": [map_side, map_side]})
    for block in range(store.num_blocks):
        start, stop = store.block_rows(block)
        n = stop - start
        store.write_valid(block, np.ones(n, bool))
        for t in range(teachers):
            y = rng.uniform(0.01, 1, n).astype(np.float32)
            store.write_block(f"t{t}", block, {
                "logits": rng.normal(0, 3, (n, classes)).astype(np.float16),
                "cam": rng.integers(0, 256, (n, map_side, map_side), dtype=np.uint8),
                "cam_max": rng.uniform(0, 2, n).astype(np.float32), "cam_class": labels[start:stop],
                "y_prob": y, "o_prob": y * rng.uniform(0, 1, n).astype(np.float32),
                "attention": rng.integers(0, 256, (n, map_side, map_side), dtype=np.uint8),
                "attention_max": rng.uniform(0, 2, n).astype(np.float32)})
    return store


def one_pass(stream: BlockStream, epoch: int) -> float:
    """Samples per second of one pass of `stream` (one process)."""
    stream.set_epoch(epoch)
    began, rows = time.perf_counter(), 0
    for batch in stream:
        rows += len(batch["index"])
    return rows / (time.perf_counter() - began)


def interleaved_rates(setups: dict, repeats: int) -> dict[str, float]:
    """{name: (store path, fields, context manager factory)} -> median samples/s; the setups take turns,
    so a change of machine load affects them alike, and a first pass of each is a warm-up."""
    rates = {name: [] for name in setups}
    for attempt in range(repeats + 1):
        for name, (path, fields, context) in setups.items():
            with context():
                store = TeacherStore.open(path)
                rate = one_pass(BlockStream(str(path), fields, list(range(store.num_blocks)), 256), attempt)
            if attempt:
                rates[name].append(rate)
    return {name: statistics.median(values) for name, values in rates.items()}


def unchecked_reads():
    """Reads without the shard-file check (zarr alone): the baseline of that check."""
    return mock.patch.object(TeacherStore, "read_block_rows",
                             lambda self, field, block, start, stop: self.array(field)[start:stop])


def no_checksums():
    """Stores written inside are compressed like the real ones but carry no crc32c: format v3's codecs."""
    shipped = cache.compressors
    return mock.patch.object(cache, "compressors", lambda: shipped()[:1])


def checksum_cost(samples: int = 8192, block_size: int = 256, repeats: int = 5) -> list[dict]:
    """Stage two's stream rate (explain-kd fields of 3 teachers, digits-sized rows) on a store with and
    without crc32c checksums, with and without the shard-file check of every read."""
    fields = ["images", "labels", *teacher_fields("explain-kd", ["t0", "t1", "t2"])]
    with tempfile.TemporaryDirectory() as folder:
        checked = synthetic_store(Path(folder) / "checked.zarr", samples, 10, 8, 3, block_size)
        with no_checksums():
            plain = synthetic_store(Path(folder) / "plain.zarr", samples, 10, 8, 3, block_size)
        rate = interleaved_rates({
            "shipped": (checked.path, fields, contextlib.nullcontext), "crc only": (checked.path, fields, unchecked_reads),
            "neither": (plain.path, fields, unchecked_reads)}, repeats)
    shipped, crc_only, neither = rate["shipped"], rate["crc only"], rate["neither"]
    return [
        {"figure": "stream, samples/s: crc32c + shard-file check (shipped)", "value": round(shipped)},
        {"figure": "stream, samples/s: crc32c only", "value": round(crc_only)},
        {"figure": "stream, samples/s: neither (format v3)", "value": round(neither)},
        {"figure": "shipped / neither", "value": round(shipped / neither, 3)},
    ]


@click.command()
@click.option("--repeats", default=5, show_default=True, help="timed passes per figure (the median is shown)")
def main(repeats):
    """Measure what the store's checksums cost stage two's reader, as ratios in one run; prints a
    markdown table."""
    rows = checksum_cost(repeats=repeats)
    click.echo("| figure | value |\n|---|---|")
    for row in rows:
        click.echo(f"| {row['figure']} | {row['value']} |")


if __name__ == "__main__":
    main()
