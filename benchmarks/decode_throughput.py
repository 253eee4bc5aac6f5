"""Student images/s from image files: stage two's view stream against torchvision's ImageFolder.

Fabricates an ImageNet tree of JPEGs (500 px wide, 333-500 px high, as ILSVRC2012's), writes a
store of K views per image (boxes drawn by the views policy; one synthetic teacher's logits, as
stage one would store them), and times whole epochs of

  - ours: `BlockStream` yielding each block's view of every image (decode in loader workers,
    crop the box, resize to 224 with antialiasing, flip) with the teacher's logits;
  - torchvision: `ImageFolder` with RandomResizedCrop(224, antialias) + RandomHorizontalFlip +
    PILToTensor, the usual training input pipeline, without any teacher signal.

Both use the same DataLoader workers (new ones every epoch, as in training) and batch size,
timed from each epoch's first batch; the setups take turns, and the table prints the median
images/s of each and their ratio (one run, one machine).

    python benchmarks/decode_throughput.py --images 512 --workers 2
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

from pipeline.cache import TeacherStore
from pipeline.data import get_dataset
from pipeline.stream import BlockStream
from pipeline.views import ViewPolicy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from extraction_throughput import fabricate_imagenet  # noqa: E402


def views_store(path: Path, dataset, views: int, block_size: int) -> TeacherStore:
    """A complete K-view store of `dataset`: the policy's boxes, and one teacher of random logits."""
    policy = ViewPolicy.of(dataset.info, views)
    store = TeacherStore.create(path, dataset.identity(), dataset.labels, None, "label", block_size, views=policy)
    store.add_teacher("t", {"arch": "synthetic", "weights_sha256": "0", "target_layer": "x", "transform": {},
                            "code_sha256": "", "map_shape": [7, 7], "heldout_top1": 0.5})
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
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "imagenet"
        fabricate_imagenet(root, args.images)
        dataset = get_dataset("ilsvrc2012", "train", str(root))
        store = views_store(Path(folder) / "views.zarr", dataset, args.views, block_size=64)
        stream = BlockStream(str(store.path), ["images", "labels", "teachers/t/logits"], list(range(store.num_blocks)),
                             args.batch_size, dataset=dataset, workers=args.workers)
        ours = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=args.workers,
                                           multiprocessing_context="forkserver", persistent_workers=False)
        transform = T.Compose([T.RandomResizedCrop(224, antialias=True), T.RandomHorizontalFlip(), T.PILToTensor()])
        folder_set = datasets.ImageFolder(str(root / "train"), transform=transform)
        theirs = torch.utils.data.DataLoader(folder_set, batch_size=args.batch_size, shuffle=True,
                                             num_workers=args.workers, multiprocessing_context="forkserver")
        rates = {"ours": [], "torchvision": []}
        images_per_second(ours, stream.set_epoch), images_per_second(theirs)  # warm-up
        for turn in range(args.repeats):
            order = ("ours", "torchvision") if turn % 2 == 0 else ("torchvision", "ours")
            for name in order:
                rates[name].append(images_per_second(ours, stream.set_epoch, turn + 1) if name == "ours"
                                   else images_per_second(theirs))
    ours_rate, theirs_rate = statistics.median(rates["ours"]), statistics.median(rates["torchvision"])
    print(f"{args.images} JPEGs, {args.views}-view store, {args.workers} workers, batch {args.batch_size}, "
          f"median of {args.repeats}")
    print("| input pipeline | images/s |\n|---|---|")
    print(f"| view stream: box crop + resize 224 + flip, with the view's teacher logits | {ours_rate:,.0f} |")
    print(f"| torchvision ImageFolder + RandomResizedCrop(224) + flip, no teacher signal | {theirs_rate:,.0f} |")
    print(f"| ratio, ours / torchvision | {ours_rate / theirs_rate:.2f} |")


if __name__ == "__main__":
    main()
