"""How far views cut by `--decode gpu`'s path are from Pillow's, on fabricated photo-sized JPEGs: each
image decoded by torchvision's `decode_jpeg` on --device (nvJPEG on CUDA, libjpeg on the CPU) and cut by
the exact integer resize, against Pillow's decode and resize of the same boxes.

    python benchmarks/device_pixels.py --device cpu --photos 128
"""

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from pipeline.bench_gpu import FULL_GPU, device_views_of, make_photos
from pipeline.devices import resolve_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--photos", type=int, default=128)
    args = parser.parse_args()
    device = resolve_device(args.device)
    scale = replace(FULL_GPU, photos=args.photos, batch=args.photos)
    with tempfile.TemporaryDirectory() as folder:
        root = make_photos(Path(folder) / "photos", scale)
        views, (largest, mean) = device_views_of(root, f"imagefolder:{root}", scale, device)
    width, height = scale.photo_size
    print(f"{len(views)} JPEGs {width}x{height} q90, {scale.views} views each at 224 px, decoded on {device}: "
          f"largest difference from Pillow's views {largest} levels, mean {mean:.4f} (torch {torch.__version__})")


if __name__ == "__main__":
    main()
