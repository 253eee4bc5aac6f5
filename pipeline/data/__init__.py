"""Data set registry: `get_dataset("digits", "train")`; unknown names list the known ones."""

from pipeline.data import digits
from pipeline.data.base import ArrayDataset, DatasetInfo, normalize
from pipeline.registry import Registry

DATASETS = Registry("data set")
DATASETS.register("digits")(digits.load)


def get_dataset(name: str, split: str, root: str | None = None, split_seed: int = 0) -> ArrayDataset:
    return DATASETS.get(name)(split, root=root, split_seed=split_seed)


__all__ = ["DATASETS", "ArrayDataset", "DatasetInfo", "get_dataset", "normalize"]
