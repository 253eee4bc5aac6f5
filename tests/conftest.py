"""Shared helpers: teacher checkpoints with random weights, and whole-store comparison."""

from pathlib import Path

import numpy as np
import torch
import zarr

from pipeline.data import get_dataset
from pipeline.models import create_model
from pipeline.models.checkpoint import save_checkpoint


def make_teacher(path: Path, arch: str, seed: int = 0, zero_head: bool = False) -> Path:
    """Save an untrained teacher checkpoint of `arch` for digits; `zero_head` zeroes its last Linear."""
    torch.manual_seed(seed)
    info = get_dataset("digits", "test").info
    model = create_model(arch, info.image_shape[2], info.num_classes)
    if zero_head:
        last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        torch.nn.init.zeros_(last.weight)
        torch.nn.init.zeros_(last.bias)
    save_checkpoint(path, model, {
        "name": arch, "arch": arch, "in_channels": info.image_shape[2], "num_classes": info.num_classes,
        "transform": {"mean": list(info.mean), "std": list(info.std)}, "metrics": {"top1": 0.5},
    })
    return path


def store_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of a Zarr store by its path, read with plain zarr."""
    group = zarr.open_group(path, mode="r")
    return {name: array[...] for name, array in group.arrays()} | {
        f"teachers/{t}/{name}": array[...]
        for t, teacher in group["teachers"].groups() for name, array in teacher.arrays()
    }


def assert_same_store(a: Path, b: Path) -> None:
    left, right = store_arrays(a), store_arrays(b)
    assert sorted(left) == sorted(right)
    for name in left:
        np.testing.assert_array_equal(left[name], right[name], err_msg=name)
        assert left[name].dtype == right[name].dtype, name
