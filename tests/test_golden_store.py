"""A store's values change only with the extraction version (pipeline.store.layout.EXTRACTION_VERSION).

A small store (two teachers with weights drawn by numpy, digits' val split, two views) is extracted and
compared with the golden copy in tests/golden/, which was made by the same extraction version: an edit
that leaves the values alone (a comment, a refactoring) passes; one that moves them beyond the stated
tolerance fails until the version is raised and the golden copy is rewritten with

    python tests/test_golden_store.py --write
"""

import sys
from pathlib import Path

import numpy as np
import torch

from pipeline.cli import main
from pipeline.data import get_dataset
from pipeline.models import create_model
from pipeline.models.checkpoint import save_checkpoint
from pipeline.store.layout import EXTRACTION_VERSION

GOLDEN = Path(__file__).parent / "golden" / "store.npz"
TEACHERS = ("resnet8_slim", "vgg8_bn")  # Grad-CAM in closed form, and by autograd
# Tolerance: processors round floats differently, so floats may move by RTOL of their size plus ATOL, and an 8-bit
# map cell by one step; classes, validity and the views' boxes and flips must be equal.
RTOL, ATOL, MAP_STEPS = 1e-2, 1e-3, 1


def numpy_teacher(path: Path, arch: str, seed: int) -> Path:
    """A digits teacher whose weights come from numpy's seeded generator (stable across torch versions)."""
    info = get_dataset("digits", "val", None).info
    model = create_model(arch, info.image_shape[2], info.num_classes)
    rng = np.random.default_rng(seed)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if not tensor.is_floating_point():
            continue
        fan_in = int(np.prod(tensor.shape[1:])) if tensor.dim() > 1 else 1
        value = rng.normal(0, np.sqrt(2 / fan_in), tensor.shape) if tensor.dim() > 1 else \
            1 + 0.1 * np.abs(rng.normal(size=tensor.shape)) if name.endswith(("weight", "running_var")) else \
            0.1 * rng.normal(size=tensor.shape)
        with torch.no_grad():
            tensor.copy_(torch.from_numpy(value))
    save_checkpoint(path, model, {
        "name": arch, "arch": arch, "in_channels": info.image_shape[2], "num_classes": info.num_classes,
        "transform": {"mean": list(info.mean), "std": list(info.std)}, "metrics": {"top1": 0.5, "val_top1": 0.5},
    })
    return path


def extract_small_store(folder: Path) -> dict[str, np.ndarray]:
    """Every array of the small store, by its key, read with plain zarr."""
    import zarr
    from click.testing import CliRunner

    teachers = [numpy_teacher(folder / f"{arch}.pt", arch, seed) for seed, arch in enumerate(TEACHERS)]
    store = folder / "golden.zarr"
    result = CliRunner().invoke(main, ["extract-teachers", "--split", "val", "--teachers", ",".join(map(str, teachers)),
                                       "--store", str(store), "--block-size", "64", "--views", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    group = zarr.open_group(store, mode="r")
    arrays = {name: array[...] for name, array in group.arrays() if name != "shard_digests"}
    for teacher, members in group["teachers"].groups():
        arrays |= {f"teachers/{teacher}/{name}": array[...] for name, array in members.arrays()
                   if name not in ("progress", "shard_digests")}
    return arrays


def differences(golden: dict[str, np.ndarray], now: dict[str, np.ndarray]) -> list[str]:
    """What moved beyond the tolerance, an array a line."""
    found = [f"{key}: {'gone' if key not in now else 'new'}" for key in sorted(set(golden) ^ set(now))]
    for key in sorted(set(golden) & set(now)):
        a, b = golden[key], now[key]
        if a.shape != b.shape or a.dtype != b.dtype:
            found.append(f"{key}: {a.dtype} {a.shape}, now {b.dtype} {b.shape}")
        elif a.dtype == np.uint8 and key.startswith("teachers/"):  # quantised maps
            moved = np.abs(a.astype(int) - b.astype(int)) > MAP_STEPS
            if moved.any():
                found.append(f"{key}: {moved.sum()} of {moved.size} cells moved by more than {MAP_STEPS} step(s)")
        elif np.issubdtype(a.dtype, np.floating):
            moved = ~np.isclose(b.astype(np.float64), a.astype(np.float64), rtol=RTOL, atol=ATOL)
            if moved.any():
                worst = np.abs(b.astype(np.float64) - a).max()
                found.append(f"{key}: {moved.sum()} of {moved.size} values moved (by up to {worst:.3g})")
        elif not np.array_equal(a, b):
            found.append(f"{key}: {(a != b).sum()} of {a.size} values differ")
    return found


def test_the_values_of_a_small_store_stay_those_of_its_extraction_version(tmp_path):
    golden = dict(np.load(GOLDEN))
    made_by = int(golden.pop("extraction_version"))
    assert made_by == EXTRACTION_VERSION, (
        f"the golden store was made by extraction version {made_by}, the code is {EXTRACTION_VERSION}: rewrite it "
        "with `python tests/test_golden_store.py --write`")
    moved = differences(golden, extract_small_store(tmp_path))
    assert not moved, ("the extraction's values moved while EXTRACTION_VERSION stayed "
                       f"{EXTRACTION_VERSION}; if that is meant, raise it in pipeline/store/layout.py and rewrite the "
                       "golden store (`python tests/test_golden_store.py --write`):\n" + "\n".join(moved))


def test_a_change_of_the_values_is_caught(tmp_path, monkeypatch):
    """What the test above guards against: Grad-CAM maps computed slightly otherwise (a tenth more weight on
    the last channel) move the maps and the scores beyond the tolerance."""
    import pipeline.explain as explain

    closed_form = explain.grad_cam

    def tilted(model, x, target, layer, **options):
        logits, cam, extra = closed_form(model, x, target, layer, **options)
        return logits, cam * (1 + 0.1 * torch.linspace(0, 1, cam.shape[-1], device=cam.device)), extra

    monkeypatch.setattr(explain, "grad_cam", tilted)
    golden = dict(np.load(GOLDEN))
    golden.pop("extraction_version")
    moved = differences(golden, extract_small_store(tmp_path))
    assert {f"teachers/{arch}/cam" for arch in TEACHERS} <= {line.split(":")[0] for line in moved}, moved
    assert not any(line.startswith(("labels", "valid", "view_")) for line in moved), moved  # only what changed


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        values = extract_small_store(Path(folder))
    GOLDEN.parent.mkdir(exist_ok=True)
    np.savez_compressed(GOLDEN, extraction_version=EXTRACTION_VERSION, **values)
    print(f"wrote {GOLDEN}: {len(values)} arrays of extraction version {EXTRACTION_VERSION}")
