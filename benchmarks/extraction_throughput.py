"""Extraction throughput and store size per sample: resnet18 at 224 px, full vs top-k logits.

Fabricates an ImageNet tree of random JPEGs (ImageNet-like sizes, 1000 classes via a
meta.bin) and a randomly initialised torchvision resnet18 teacher, then runs
`extract-teachers` once per logits mode and prints one table. Timings compare modes
within one run on one machine; random weights make maps and logits noise-like, so the
bytes are those of hard-to-compress values.

    python benchmarks/extraction_throughput.py --images 512 --num-workers 2
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from pipeline.config import ExtractConfig
from pipeline.devices import resolve_device
from pipeline.extraction import extract_teachers as extract
from pipeline.fabricate import make_torchvision_teacher


def fabricate_imagenet(root: Path, images: int, classes_present: int = 8, width: int = 500) -> None:
    """`images` JPEGs `width` px wide and 2/3 to 1 times that high (500: as most of ILSVRC2012's)."""
    rng = np.random.default_rng(0)
    wnids = [f"n{i:08d}" for i in range(1000)]
    for i in range(images):
        folder = root / "train" / wnids[i % classes_present]
        folder.mkdir(parents=True, exist_ok=True)
        h, w = int(rng.integers(width * 2 // 3, width)), width
        pixels = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)  # smooth-ish, like photos
        Image.fromarray(pixels).resize((w, h), Image.BILINEAR).save(folder / f"img_{i:06d}.JPEG", quality=90)
    (root / "val" / wnids[0]).mkdir(parents=True)
    torch.save(({w: (w,) for w in wnids}, []), root / "meta.bin")


def bytes_under(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fabricate_imagenet(root / "imagenet", args.images)
        teacher = make_torchvision_teacher(root / "resnet18.pt", "resnet18", 1000)
        for mode in ("full", f"topk:{args.topk}"):
            store = root / f"{mode.replace(':', '')}.zarr"
            cfg = ExtractConfig(dataset="ilsvrc2012", data_root=str(root / "imagenet"), teachers=[str(teacher)],
                                store=str(store), batch_size=args.batch_size, num_workers=args.num_workers,
                                logits=mode, device=args.device)
            start = time.perf_counter()
            extract(cfg)
            seconds = time.perf_counter() - start
            teacher_dir = store / "teachers" / "resnet18"
            logit_bytes = sum(bytes_under(teacher_dir / f) for f in ("logits", "logit_classes", "tail_logsumexp")
                              if (teacher_dir / f).exists())
            rows.append({"logits": mode, "images": args.images, "seconds": round(seconds, 1),
                         "images/s": round(args.images / seconds, 1),
                         "bytes/sample/teacher": round(bytes_under(teacher_dir) / args.images, 1),
                         "of which logits": round(logit_bytes / args.images, 1)})
    print(f"\nresnet18, 224 px, {resolve_device(args.device)}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.num_workers} loader workers")
    print(pd.DataFrame(rows).to_markdown(index=False))


if __name__ == "__main__":
    main()
