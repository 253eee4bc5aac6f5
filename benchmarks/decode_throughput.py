"""Student images/s from image files: stage two's view stream against torchvision's ImageFolder.

Fabricates an ImageNet tree of JPEGs (`--width` px wide, 2/3 to 1 times that high; 500 as
most of ILSVRC2012's), writes stores of K views per image (boxes drawn by the views policy, with
and without JPEG draft decoding; one synthetic teacher's logits, as stage one would store them),
and times whole epochs of

  - ours: `BlockStream` yielding each block's view of every image (decode in loader workers,
    at the view's draft scale or whole, cut the box, resize to 224 with antialiasing, flip) with
    the teacher's logits;
  - torchvision: `ImageFolder` with RandomResizedCrop(224, antialias) + RandomHorizontalFlip +
    PILToTensor, the usual training input pipeline, without any teacher signal.

All use the same DataLoader workers (new ones every epoch, as in training) and batch size,
timed from each epoch's first batch; the setups take turns, and the table prints the median
images/s of each, its ratio to torchvision's, and the share of views a draft decode serves
(one run, one machine).

    python benchmarks/decode_throughput.py --images 512 --workers 2 --width 1000
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import datasets
from torchvision.transforms import v2 as T

from pipeline.data import get_dataset
from pipeline.store.teacher_store import TeacherStore
from pipeline.stream import BlockStream
from pipeline.views import ViewPolicy, draft_scale

sys.path.insert(0, str(Path(__file__).resolve().parent))
from extraction_throughput import fabricate_imagenet  # noqa: E402


def views_store(path: Path, dataset, views: int, block_size: int, draft: bool) -> TeacherStore:
    """A complete K-view store of `dataset`: the policy's boxes, and one teacher of random logits."""
    policy = ViewPolicy.of(dataset.info, views, draft=draft)
    store = TeacherStore.create(path, dataset.identity(), dataset.labels, None, "label", block_size, views=policy)
    store.add_teacher("t", {"arch": "synthetic", "weights_sha256": "0", "target_layer": "x", "transform": {}, "map_shape": [7, 7], "heldout_top1": 0.5})
    rng = np.random.default_rng(0)
    for block in range(store.num_blocks):
        rows = range(*store.block_rows(block))
        boxes, flips = zip(*(policy.boxes(dataset.sample_id(i), *Image.open(dataset.root / dataset.files[i].decode()).size[::-1])
                             for i in rows))
        store.write_samples(block, {"valid": np.ones(len(rows), bool), "view_boxes": np.stack(boxes),
                                    "view_flips": np.stack(flips)})
        arrays = {field: np.zeros((len(rows), *shape[1:]), dtype)
                  for field, (shape, dtype) in store.teacher_shapes([7, 7]).items()}
        arrays["logits"][...] = rng.normal(size=arrays["logits"].shape)
        store.write_block("t", block, arrays)
    return store


def images_per_second(loader, epoch_setter=None, epoch: int = 0) -> float:
    """Images/s of one epoch from its first batch on: the workers' start (a second or more, the same
    for both pipelines) is left out, so that small trees measure decoding, not process start-up."""
    if epoch_setter:
        epoch_setter(epoch)
    began, seen = None, 0
    for batch in loader:
        if began is None:
            began = time.perf_counter()
            continue
        seen += len(batch["images"] if isinstance(batch, dict) else batch[0])
    return seen / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--width", type=int, default=500, help="the JPEGs' width in pixels")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "imagenet"
        fabricate_imagenet(root, args.images, width=args.width)
        dataset = get_dataset("ilsvrc2012", "train", str(root))
        loaders, drafted = {}, 0.0
        for name, draft in (("view stream, JPEG draft", True), ("view stream, full decode", False)):
            store = views_store(Path(folder) / f"{draft}.zarr", dataset, args.views, 64, draft)
            stream = BlockStream(str(store.location), ["images", "labels", "teachers/t/logits"],
                                 list(range(store.num_blocks)), args.batch_size, dataset=dataset, workers=args.workers)
            loaders[name] = stream, torch.utils.data.DataLoader(
                stream, batch_size=None, num_workers=args.workers, multiprocessing_context="forkserver")
            boxes = store.group["view_boxes"][...].reshape(-1, 4)
            drafted = np.mean([draft_scale(box, (224, 224)) > 1 for box in boxes]) if draft else drafted
        transform = T.Compose([T.RandomResizedCrop(224, antialias=True), T.RandomHorizontalFlip(), T.PILToTensor()])
        folder_set = datasets.ImageFolder(str(root / "train"), transform=transform)
        loaders["torchvision"] = None, torch.utils.data.DataLoader(
            folder_set, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
            multiprocessing_context="forkserver")
        rates = {name: [] for name in loaders}
        for turn in range(args.repeats + 1):  # turn 0 warms up
            for name in list(loaders)[turn % 3:] + list(loaders)[:turn % 3]:
                stream, loader = loaders[name]
                rate = images_per_second(loader, stream and stream.set_epoch, turn)
                rates[name] += [rate] if turn else []
    median = {name: statistics.median(r) for name, r in rates.items()}
    print(f"{args.images} JPEGs {args.width} px wide, {args.views}-view stores ({drafted:.0%} of views decoded at "
          f"1/2 to 1/8 scale with draft), {args.workers} workers, batch {args.batch_size}, median of {args.repeats}")
    print("| input pipeline (224 px, flips) | images/s | range | / torchvision |\n|---|--:|--:|--:|")
    for name, rate in median.items():
        print(f"| {name} | {rate:,.0f} | {min(rates[name]):,.0f}-{max(rates[name]):,.0f} | "
              f"{rate / median['torchvision']:.2f} |")


if __name__ == "__main__":
    main()
