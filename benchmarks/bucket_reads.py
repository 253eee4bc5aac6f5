"""What stage two asks of a bucket, and what a bucket of a given bandwidth and latency can feed (docs/scaling.md).

    python benchmarks/bucket_reads.py --samples 8192 --block-size 1024

Writes an ImageNet-shaped synthetic store (3 teachers, top-10 logits, 7x7 maps, one view) into a bucket of a
local moto server (the dev extra), reads one epoch of explain-kd's fields with stage two's reader and counts
the requests and bytes per block. The per-request time measured against moto is moto's on this machine, not a
bucket's; the table of what a bucket feeds is arithmetic from the counts: per node (one reading process), samples/s
is the smaller of the bandwidth over the bytes per sample and the requests in flight over the requests per sample
times the latency. A block's shard files are one request each whatever its rows, so the table also gives
ILSVRC2012's block size (16,384 rows), at the same requests per block.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

from pipeline.bench import TEACHERS, synthetic_store
from pipeline.fabricate import local_s3
from pipeline.methods import method_of
from pipeline.store.location import REQUESTS_AT_ONCE, location
from pipeline.stream import BlockStream

BUCKETS = [(0.1, 50), (1.0, 20), (1.0, 5), (10.0, 10)]  # (GB/s, ms per request) of the table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--mix-blocks", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    with local_s3() as bucket:
        url = f"{bucket}/synthetic.zarr"
        began = time.perf_counter()
        store = synthetic_store(url, args.samples, 1000, 7, args.block_size, {"mode": "topk", "k": 10})
        written = time.perf_counter() - began
        fields = ["labels", *method_of("explain-kd").arrays(list(TEACHERS), store.logit_fields)]
        stream = BlockStream(url, fields, list(range(store.num_blocks)), 256, seed=1, mix_blocks=args.mix_blocks,
                             hold_bytes=0)
        where = location(url)  # the client of every read of the store in this process
        requests, metadata, read = where.requests, where.metadata_requests, where.bytes_read  # the epoch's reads
        began = time.perf_counter()
        samples = sum(len(batch["labels"]) for batch in stream)
        seconds = time.perf_counter() - began
        metadata = where.metadata_requests - metadata  # each array's zarr.json, once per epoch and process
        requests_per_block = (where.requests - requests - metadata) / store.num_blocks
        bytes_per_block = (where.bytes_read - read) / store.num_blocks
        bytes_per_sample = bytes_per_block * store.num_blocks / samples
        small, key = [], store.shard_key("labels", 0)
        for _ in range(200):
            began = time.perf_counter()
            small_bytes = len(where.read(key))
            small.append(time.perf_counter() - began)
    in_flight = REQUESTS_AT_ONCE
    figures = {
        "samples": samples, "block size": args.block_size, "blocks": store.num_blocks,
        "requests per block (shard files, digest records)": requests_per_block,
        "metadata requests per epoch": metadata, "bytes per block": bytes_per_block,
        "bytes per sample": bytes_per_sample, "requests in flight": in_flight,
        "moto: median s per GET of one small shard file": statistics.median(small),
        "bytes of that file": small_bytes,
        "moto: samples/s read (this machine, not a bucket)": samples / seconds,
        "moto: s to write the store": written,
        "a bucket feeds (samples/s per reading process)": {
            f"{rows:,} rows a block, {gbps:g} GB/s, {ms:g} ms": min(
                gbps * 1e9 / bytes_per_sample, in_flight * rows / (requests_per_block * ms / 1e3))
            for rows in dict.fromkeys([args.block_size, 16384]) for gbps, ms in BUCKETS},
    }
    width = max(map(len, figures))
    for name, value in figures.items():
        if isinstance(value, dict):
            print(name)
            for bucket_kind, rate in value.items():
                print(f"  {bucket_kind:>{width - 2}}  {rate:,.0f}")
        else:
            print(f"{name:>{width}}  {value:,.4g}" if isinstance(value, float) else f"{name:>{width}}  {value:,}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
