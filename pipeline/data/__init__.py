"""Data set registry: `get_dataset("cifar10", "train", root)`; unknown names list the known ones.

The data root: `--data-root` on the command line, else `data.data_root` in params.yaml,
else the environment variable PIPELINE_DATA_ROOT, else data_cache/datasets.
"""

import os

from pipeline.data import cifar, cluttered, digits, domains, imagenet, shapes
from pipeline.data.base import ArrayDataset, DatasetInfo, Geometry, SampleSet, UnknownSplit, normalize
from pipeline.data.files import ImageFileDataset, UnreadableImage
from pipeline.registry import Registry

DATA_ROOT_ENV, DEFAULT_DATA_ROOT = "PIPELINE_DATA_ROOT", "data_cache/datasets"
PATH_DATASETS = ("imagefolder",)  # named `imagefolder:<path>`; the path is its root

DATASETS = Registry("data set")
DATASETS.register("digits")(digits.load)
DATASETS.register("cluttered-digits")(cluttered.load)
DATASETS.register("cluttered-shapes")(shapes.load)
DATASETS.register("shape-domains")(domains.load)
DATASETS.register("cifar10")(cifar.load_cifar10)
DATASETS.register("cifar100")(cifar.load_cifar100)
DATASETS.register("ilsvrc2012")(imagenet.load_ilsvrc2012)
DATASETS.register("imagefolder:<path>")(imagenet.load_imagefolder)


def resolve_data_root(root: str | None) -> str:
    return root or os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT


def get_dataset(name: str, split: str, root: str | None = None, split_seed: int = 0,
                download: bool = False) -> SampleSet:
    kind, _, path = name.partition(":")
    if kind in PATH_DATASETS:
        return DATASETS.get(f"{kind}:<path>")(split, root=path, split_seed=split_seed, download=download)
    return DATASETS.get(name)(split, root=resolve_data_root(root), split_seed=split_seed, download=download)


def get_test_split(name: str, root: str | None = None, split_seed: int = 0, download: bool = False) -> SampleSet:
    """The split test metrics are reported on: `test`, or `val` where there is no test split (ImageNet)."""
    try:
        return get_dataset(name, "test", root, split_seed, download)
    except UnknownSplit:
        return get_dataset(name, "val", root, split_seed, download)


def get_val_split(name: str, root: str | None = None, split_seed: int = 0, download: bool = False) -> SampleSet | None:
    """The `val` split where the data set has one besides its test split (cluttered-digits), else None."""
    try:
        val = get_dataset(name, "val", root, split_seed, download)
    except UnknownSplit:
        return None
    return val if "test" in val.info.splits else None


Dataset = SampleSet

__all__ = ["DATASETS", "ArrayDataset", "Dataset", "DatasetInfo", "Geometry", "ImageFileDataset",
           "UnknownSplit", "UnreadableImage", "get_dataset", "get_test_split", "get_val_split", "normalize", "resolve_data_root"]
