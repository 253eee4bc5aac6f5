"""Data sets read from image files in class folders (ImageNet, any ImageFolder tree).

Only paths and labels are held in memory; an image is decoded when it is asked for: for
evaluation at the geometry (resize + centre crop) of the model that reads it, exactly as
torchvision's `ImageClassification` eval transform does it (uint8 resize with antialiasing,
then crop); for views (pipeline.views) at the scale each view needs.
"""

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from pipeline.data.base import DatasetInfo, Geometry, SampleSet
from pipeline.errors import PipelineError
from pipeline.views import draft_scale, render

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class UnreadableImage(PipelineError):
    """An image file that cannot be decoded; extraction stops, or skips it with --skip-corrupt."""


def unreadable(path: Path, error: Exception) -> UnreadableImage:
    return UnreadableImage(f"cannot read image {path} ({type(error).__name__}: {error}); "
                           "replace the file, or pass --skip-corrupt to skip and record it")


DECODE_ERRORS = (OSError, ValueError, Image.DecompressionBombError)


def decode(path: Path, scale: int = 1) -> Image.Image:
    """The RGB image of a file, decoded at 1/`scale` of each side: 2, 4 or 8 for a JPEG, whose decoder
    shrinks while it decodes (draft mode)."""
    try:
        with Image.open(path) as image:
            full = image.size
            if scale > 1:
                image.draft("RGB", (full[0] // scale, full[1] // scale))
            decoded = image.convert("RGB")
    except DECODE_ERRORS as error:
        raise unreadable(path, error) from None
    if decoded.size != (math.ceil(full[0] / scale), math.ceil(full[1] / scale)):
        raise PipelineError(f"decoding {path} at 1/{scale} gave {decoded.size[0]}x{decoded.size[1]} pixels of "
                            f"{full[0]}x{full[1]}, not 1/{scale} of each side; extract with --no-jpeg-draft, and report "
                            "this with your Pillow version")
    return decoded


class ImageFile:
    """Views of one image file. Its size comes from the header; each view is decoded (once per scale)
    at its draft scale when `draft` and the file is a JPEG, else whole, and its box cut at that scale."""

    def __init__(self, path: Path, draft: bool):
        self.path, self.decoded = path, {}
        try:
            with Image.open(path) as image:
                self.width, self.height = image.size
                self.format, self.mode = image.format, image.mode
                self.draft = draft and image.format == "JPEG"  # other formats decode whole, once
        except DECODE_ERRORS as error:
            raise unreadable(path, error) from None

    def view(self, box, flip: bool, size: tuple[int, int], interpolation: str = "bilinear") -> np.ndarray:
        wanted = draft_scale(box, size) if self.draft else 1
        if wanted not in self.decoded:
            self.decoded[wanted] = decode(self.path, wanted)
        return render(self.decoded[wanted], [v / wanted for v in box], flip, size, interpolation)


class ImageFileDataset(SampleSet):
    """One split of image files: `files` (relative to `root`, UTF-8) in class then file-name order."""

    def __init__(self, info: DatasetInfo, split: str, root: Path, files: np.ndarray, labels: np.ndarray):
        self.info, self.split, self.root = info, split, Path(root)
        self.files, self.labels = files, labels.astype(np.int64)  # files: UTF-8 bytes, 1 byte a character

    @property
    def ids(self):
        """Relative paths identify samples wherever the tree is mounted."""
        return (name.decode() for name in self.files)

    def describe(self, index: int) -> str:
        return str(self.path(index))

    def sample_id(self, index: int) -> str:
        return self.files[index].decode()

    def path(self, index: int) -> Path:
        return self.root / self.files[index].decode()

    def view_source(self, index: int, draft: bool = False) -> ImageFile:
        return ImageFile(self.path(index), draft)

    def image(self, index: int, geometry: Geometry | None = None) -> np.ndarray:
        """uint8 (H, W, 3): resized so the shorter side is `geometry.resize`, centre-cropped."""
        geometry = geometry or self.info.geometry
        pixels = TF.resize(TF.pil_to_tensor(decode(self.path(index))), [geometry.resize],
                           interpolation=InterpolationMode(geometry.interpolation), antialias=True)
        return TF.center_crop(pixels, [geometry.crop]).permute(1, 2, 0).numpy()


def class_folders(folder: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith("."))


def scan_class_folders(folder: Path, classes: list[str], root: Path) -> tuple[np.ndarray, np.ndarray]:
    """(files relative to `root`, labels) of every image in folder/<class>/, classes in the given order.

    A class folder missing from `folder` contributes nothing (a subset of ImageNet keeps the
    standard class indices); a folder that is not one of `classes` is an error.
    """
    unknown = sorted(set(class_folders(folder)) - set(classes))
    if unknown:
        raise PipelineError(f"{folder} has class folder(s) {', '.join(unknown[:5])} that are not among the "
                            f"{len(classes)} classes (first: {', '.join(classes[:3])}); remove them")
    files, labels = [], []
    for label, name in enumerate(classes):
        if not (folder / name).is_dir():
            continue
        names = sorted(e.name for e in os.scandir(folder / name)
                       if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
        files += [str((folder / name / f).relative_to(root)) for f in names]
        labels += [label] * len(names)
    if not files:
        raise PipelineError(f"{folder} holds no images in class folders ({', '.join(IMAGE_EXTENSIONS)} files "
                            "in <class>/ sub-folders expected)")
    return np.array([f.encode() for f in files]), np.array(labels, dtype=np.int64)
