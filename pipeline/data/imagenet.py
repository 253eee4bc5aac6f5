"""ILSVRC2012 and any folder-per-class image tree.

`ilsvrc2012` reads <root>/train/<wnid>/ and <root>/val/<wnid>/ (torchvision's `ImageNet`
layout after it sorted val/ into class folders, or a plain ImageFolder copy). Class
index = position of the wnid in sorted order, so torchvision's pretrained heads line
up; with torchvision's devkit file <root>/meta.bin the full class list comes from it,
so a tree holding only some classes keeps the standard indices.
"""

import re
from pathlib import Path

import torch

from pipeline.data.base import DatasetInfo, Geometry, check_split
from pipeline.data.files import IMAGE_EXTENSIONS, ImageFileDataset, class_folders, scan_class_folders
from pipeline.errors import PipelineError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGENET_EVAL = Geometry(resize=256, crop=224)


def load_ilsvrc2012(split: str, root: str, split_seed: int = 0, download: bool = False) -> ImageFileDataset:
    """The official train or val split; `split_seed` and `download` are unused (no download)."""
    root = Path(root)
    expected = f"{root}/train/<wnid>/*.JPEG and {root}/val/<wnid>/*.JPEG (torchvision ImageNet layout)"
    classes = devkit_classes(root) or split_classes(root, "train" if (root / "train").is_dir() else split, expected)
    info = DatasetInfo("ilsvrc2012", len(classes), (224, 224, 3), IMAGENET_MEAN, IMAGENET_STD,
                       ("train", "val"), geometry=IMAGENET_EVAL, mirror_symmetric=True)
    check_split(info, split)
    folder = split_folder(root, split, expected)
    files, labels = scan_class_folders(folder, classes, root)
    return ImageFileDataset(info, split, root, files, labels)


def load_imagefolder(split: str, root: str, split_seed: int = 0, download: bool = False) -> ImageFileDataset:
    """`imagefolder:<path>`: <path>/<split>/<class>/ for the splits present (train, val, test), or
    <path>/<class>/ as the one split `all`; classes sorted by folder name. Images are seen at ImageNet's
    eval geometry (shorter side to 256, centre 224 x 224), or at the one `<path>@<size>` or
    `<path>@<resize>/<crop>` names: a folder of 32 px images is `<path>@32`, its own pixels."""
    root, geometry = folder_geometry(root)
    if not root.is_dir():
        raise PipelineError(f"image folder {root} does not exist; pass imagefolder:<path to class folders>")
    splits = tuple(s for s in ("train", "val", "test") if (root / s).is_dir()) or ("all",)
    expected = f"{root}/<split>/<class>/*.jpg or {root}/<class>/*.jpg"
    classes = class_folders(root) if splits == ("all",) else split_classes(root, splits[0], expected)
    if not classes:
        raise PipelineError(f"expected {expected}; {root} has no class folders")
    info = DatasetInfo("imagefolder", len(classes), (geometry.crop, geometry.crop, 3), IMAGENET_MEAN, IMAGENET_STD,
                       splits, geometry=geometry, mirror_symmetric=True)
    check_split(info, split)
    files, labels = scan_class_folders(root if split == "all" else root / split, classes, root)
    return ImageFileDataset(info, split, root, files, labels)


def folder_geometry(root: str) -> tuple[Path, Geometry]:
    """`<path>`, `<path>@<size>` or `<path>@<resize>/<crop>` -> the folder and the geometry its images are
    seen at (an existing folder, or text after the last @ that is no size, is all path)."""
    path, at, spec = root.rpartition("@")
    if not at or Path(root).is_dir():
        return Path(root), IMAGENET_EVAL
    match = re.fullmatch(r"(\d+)(?:/(\d+))?", spec)
    if not match:  # an @ inside the path (/mnt/u@host/images)
        return Path(root), IMAGENET_EVAL
    resize, crop = int(match[1]), int(match[2] or match[1])
    if not 0 < crop <= resize:
        raise PipelineError(f"imagefolder:{root}: after @ give the size images are seen at, @<size> (shorter side "
                            "resized to it, the centre square cropped: @32 for 32 px images) or @<resize>/<crop> "
                            "with crop <= resize (@256/224, the default)")
    return Path(path), Geometry(resize, crop)


def devkit_classes(root: Path) -> list[str] | None:
    """Sorted wnids of torchvision's meta.bin (parsed devkit), or None without one."""
    meta = root / "meta.bin"
    if not meta.is_file():
        return None
    try:
        wnid_to_classes = torch.load(meta, weights_only=True)[0]
        return sorted(wnid_to_classes)
    except Exception as error:
        raise PipelineError(f"{meta} is not torchvision's ImageNet meta.bin ({type(error).__name__}); "
                            "delete it (classes then come from train/) or let torchvision rewrite it") from None


def split_folder(root: Path, split: str, expected: str) -> Path:
    folder = root / split
    if not folder.is_dir():
        raise PipelineError(f"expected {expected}; {folder} does not exist (pass --data-root)")
    loose = [e.name for e in folder.iterdir() if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)]
    if loose:
        raise PipelineError(f"{folder} holds images directly ({loose[0]}, ...); sort them into class folders "
                            "first (torchvision.datasets.ImageNet(root, split='val') does so with the devkit)")
    return folder


def split_classes(root: Path, split: str, expected: str) -> list[str]:
    classes = class_folders(split_folder(root, split, expected))
    if not classes:
        raise PipelineError(f"expected {expected}; {root / split} has no class folders")
    return classes
