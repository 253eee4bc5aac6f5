"""The trials behind the store's block size, chunks per block and codec: stage two's reader rate and
bytes per sample for each, on one ImageNet-shaped synthetic store layout (docs/reader.md).

    python benchmarks/reader_trials.py --samples 32768

Rates are samples/s of the explain-kd fields of 3 teachers (top-10 logits, 7x7 maps), the median
of 3 passes after a warm-up, the store's files dropped from the page cache before each pass.
"""

import argparse
import tempfile
import time
from pathlib import Path
from unittest import mock

import pandas as pd
from zarr.codecs import BloscCodec, Crc32cCodec

from pipeline.bench import TEACHERS, bytes_under, evict, median_seconds, stream_pass, synthetic_store, zarr_pass
from pipeline.methods import method_of
from pipeline.store import shards

CODECS = {"zstd 5, bitshuffle (shipped)": shards.compressors,
          "lz4 5, bitshuffle": lambda: (BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"), Crc32cCodec()),
          "zstd 1, shuffle": lambda: (BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"), Crc32cCodec())}
LAYOUTS = [(256, 4), (1024, 4), (4096, 1), (4096, 4), (4096, 16), (16384, 4)]  # (block size, chunks per block)


def trial(folder: Path, samples: int, block: int, chunks: int, codec: str, zarr_too: bool) -> dict:
    path = folder / f"{block}-{chunks}-{codec[:4]}.zarr"
    began = time.perf_counter()
    with mock.patch.object(shards, "compressors", CODECS[codec]):
        store = synthetic_store(path, samples, 1000, 7, block, {"mode": "topk", "k": 10}, chunks_per_block=chunks)
    written = time.perf_counter() - began
    fields = ["labels", *method_of("explain-kd").arrays(list(TEACHERS), store.logit_fields)]
    setups = {"ours": lambda: stream_pass(store, fields)}
    if zarr_too:
        setups["zarr"] = lambda: zarr_pass(store, fields)
    seconds = median_seconds(setups, 3, lambda: evict(path))
    return {"block size": block, "chunks/block": chunks, "codec": codec,
            "reader samples/s": round(samples / seconds["ours"]),
            "plain zarr samples/s": round(samples / seconds["zarr"]) if zarr_too else "-",
            "bytes/sample (3 teachers)": round(bytes_under(path) / samples, 1),
            "write samples/s": round(samples / written)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32768)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for block, chunks in LAYOUTS:
            rows.append(trial(Path(folder), args.samples, block, chunks, "zstd 5, bitshuffle (shipped)",
                              zarr_too=(block, chunks) in ((256, 4), (4096, 4))))
        for codec in list(CODECS)[1:]:
            rows.append(trial(Path(folder), args.samples, 4096, 4, codec, zarr_too=False))
    print(pd.DataFrame(rows).to_markdown(index=False))


if __name__ == "__main__":
    main()
