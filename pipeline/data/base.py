"""What every data set in the registry provides: uint8 images, int labels, stable ids."""

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.views import PixelSource


@dataclass(frozen=True)
class Geometry:
    """How a stored image becomes a model input: resize the shorter side, then centre-crop."""

    resize: int
    crop: int
    interpolation: str = "bilinear"

    def as_dict(self) -> dict:
        return {"resize": self.resize, "crop": self.crop, "interpolation": self.interpolation}


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    image_shape: tuple[int, int, int]  # H, W, C of the uint8 images a model sees
    mean: tuple[float, ...]  # per channel, for images scaled to [0, 1]
    std: tuple[float, ...]
    splits: tuple[str, ...]
    geometry: Geometry | None = None  # eval resize/crop of data sets read from image files
    mirror_symmetric: bool = False  # a left-right flipped image keeps its class (photos, not digits)


class SampleSet(torch.utils.data.Dataset):
    """What every data set split provides: `info`, `split`, `labels` (N,), stable `ids`,
    `image(i, geometry)` -> uint8 (H, W, C) (the eval transform's image), `sample_id(i)` (sample i's
    id, which its views are drawn from) and `view_source(i, draft)` -> the image views are cut from,
    with its `height`, `width` and `view(box, flip, size, interpolation)` (pipeline.views); items are
    (image, label)."""

    info: DatasetInfo
    split: str
    labels: np.ndarray
    groups: np.ndarray | None = None  # each sample's group (shape-domains' domains), where the data set has them

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.image(index), int(self.labels[index])

    def identity(self) -> dict:
        """What a teacher store records about the data it was made from (its `dataset` attribute)."""
        digest = hashlib.sha256()
        for sample_id, label in zip(self.ids, self.labels):
            digest.update(f"{sample_id}:{label}\n".encode())
        return {
            "name": self.info.name,
            "split": self.split,
            "num_samples": len(self),
            "num_classes": self.info.num_classes,
            "image_shape": list(self.info.image_shape),
            "ids_sha256": digest.hexdigest(),
        }


class ArrayDataset(SampleSet):
    """One split held in memory: images uint8 (N, H, W, C), labels int64 (N,), ids str (N,), and where the data
    set has them, `groups` str (N,): each sample's group, such as the domain it is drawn in."""

    def __init__(self, info: DatasetInfo, split: str, images: np.ndarray, labels: np.ndarray, ids: np.ndarray,
                 groups: np.ndarray | None = None):
        if not (len(images) == len(labels) == len(ids)) or (groups is not None and len(groups) != len(ids)):
            raise ValueError("images, labels, ids and groups must have the same length")
        self.info, self.split = info, split
        self.images, self.labels, self.ids, self.groups = images, labels.astype(np.int64), ids, groups

    def subset(self, rows: np.ndarray) -> "ArrayDataset":
        """The samples at `rows` (indexes into this split), as a split of their own: a specialist's training data."""
        return ArrayDataset(self.info, self.split, self.images[rows], self.labels[rows], self.ids[rows],
                            None if self.groups is None else self.groups[rows])

    def image(self, index: int, geometry: Geometry | None = None) -> np.ndarray:
        """The stored image; in-memory data sets have one native geometry."""
        return self.images[index]

    def describe(self, index: int) -> str:
        return str(self.ids[index])

    def sample_id(self, index: int) -> str:
        return str(self.ids[index])

    def view_source(self, index: int, draft: bool = False) -> PixelSource:
        """Views of the stored image (`draft` concerns JPEG files only)."""
        return PixelSource(self.images[index])


class UnknownSplit(PipelineError):
    pass


def check_split(info: DatasetInfo, split: str) -> None:
    if split not in info.splits:
        raise UnknownSplit(f"data set {info.name!r} has no split {split!r}; choose one of: {', '.join(info.splits)}")


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float32 (B, C, H, W) in [0, 1], with plain NCHW strides."""
    # Explicit NCHW strides: for C=1 the permuted view also looks channels-last, and oneDNN's
    # backward on such input crashes torch 2.14.1 on the CPU (double free, odd batch sizes).
    return images.permute(0, 3, 1, 2).float().div_(255.0).clone(memory_format=torch.contiguous_format)


def standardize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """(x - mean) / std per channel of a (B, C, H, W) batch in [0, 1]."""
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float32 (B, C, H, W), scaled to [0, 1] then standardised."""
    return standardize(to_unit(images), mean, std)
