"""A store's values change only with the extraction version (pipeline.store.layout.EXTRACTION_VERSION).

Two small stores (two teachers with weights drawn by numpy, digits' val split, two views; one of the label's
maps and all logits, one of the predicted class's maps and top-3 logits) are extracted and compared with the
golden copy in tests/golden/, made by the same extraction version: an edit that leaves the values alone (a
comment, a refactoring) passes; one that moves them beyond the stated tolerance fails until the version is
raised and the golden copy is rewritten with

    python tests/test_golden_store.py --write

which refuses to rewrite values that moved while the version stayed.
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
STORES = {"label-full": [], "predicted-top3": ["--target", "predicted", "--logits", "topk:3"]}
# Tolerance: processors round floats differently (the order of a convolution's sums), by about 1e-6 of a value in
# float32: float32 values may move by RTOL32 of their size, float16 ones by one unit in the last place (RTOL16);
# an 8-bit map cell by one step, in at most MAP_SHARE of the cells; classes, validity, boxes and flips are equal.
RTOL32, RTOL16, MAP_SHARE = 1e-4, 2**-10, 0.01


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


def extract_small_stores(folder: Path, only: str | None = None) -> dict[str, np.ndarray]:
    """Every array of each small store (or of the one named `only`), by "<store>/<key>", read with plain zarr, and
    each teacher's figures on the held-out split (what kd, at and --kd-source best choose by)."""
    import zarr
    from click.testing import CliRunner

    teachers = [numpy_teacher(folder / f"{arch}.pt", arch, seed) for seed, arch in enumerate(TEACHERS)]
    arrays = {}
    for name, options in STORES.items():
        if only not in (None, name):
            continue
        store = folder / f"{name}.zarr"
        result = CliRunner().invoke(main, ["extract-teachers", "--split", "val", "--teachers",
                                           ",".join(map(str, teachers)), "--store", str(store), "--block-size", "64",
                                           "--views", "2", "--device", "cpu", *options])
        assert result.exit_code == 0, result.output
        group = zarr.open_group(store, mode="r")
        arrays |= {f"{name}/{key}": array[...] for key, array in group.arrays() if key != "shard_digests"}
        for teacher, members in group["teachers"].groups():
            arrays |= {f"{name}/teachers/{teacher}/{key}": array[...] for key, array in members.arrays()
                       if key not in ("progress", "shard_digests")}
            heldout = members.attrs["heldout"]
            arrays[f"{name}/heldout/{teacher}"] = np.array([heldout["top1"], heldout["mean_drop"]], np.float32)
    return arrays


def differences(golden: dict[str, np.ndarray], now: dict[str, np.ndarray]) -> list[str]:
    """What moved beyond the tolerance, an array a line."""
    found = [f"{key}: {'gone' if key not in now else 'new'}" for key in sorted(set(golden) ^ set(now))]
    for key in sorted(set(golden) & set(now)):
        a, b = golden[key], now[key]
        if a.shape != b.shape or a.dtype != b.dtype:
            found.append(f"{key}: {a.dtype} {a.shape}, now {b.dtype} {b.shape}")
        elif a.dtype == np.uint8 and "/teachers/" in key:  # quantised maps
            steps = np.abs(a.astype(int) - b.astype(int))
            if steps.max() > 1 or (steps > 0).mean() > MAP_SHARE:
                found.append(f"{key}: {(steps > 0).sum()} of {steps.size} cells moved, by up to {steps.max()} step(s)")
        elif np.issubdtype(a.dtype, np.floating):
            rtol = RTOL16 if a.dtype == np.float16 else RTOL32
            moved = ~np.isclose(b.astype(np.float64), a.astype(np.float64), rtol=rtol, atol=0)
            if moved.any():
                worst = (np.abs(b.astype(np.float64) - a) / np.maximum(np.abs(a), 1e-30)).max()
                found.append(f"{key}: {moved.sum()} of {moved.size} values moved (by up to {worst:.3g} of their size)")
        elif not np.array_equal(a, b):
            found.append(f"{key}: {(a != b).sum()} of {a.size} values differ")
    return found


def test_the_values_of_a_small_store_stay_those_of_its_extraction_version(tmp_path):
    golden = dict(np.load(GOLDEN))
    made_by = int(golden.pop("extraction_version"))
    assert made_by == EXTRACTION_VERSION, (
        f"the golden store was made by extraction version {made_by}, the code is {EXTRACTION_VERSION}: rewrite it "
        "with `python tests/test_golden_store.py --write`")
    moved = differences(golden, extract_small_stores(tmp_path))
    assert not moved, ("the extraction's values moved while EXTRACTION_VERSION stayed "
                       f"{EXTRACTION_VERSION}; if that is meant, raise it in pipeline/store/layout.py and rewrite the "
                       "golden store (`python tests/test_golden_store.py --write`):\n" + "\n".join(moved))


def test_a_small_change_of_the_values_is_caught(tmp_path, monkeypatch):
    """What the test above guards against: Grad-CAM maps computed slightly otherwise (up to 1 % more weight
    towards the right edge of the map) move the maps and the scores beyond the tolerance."""
    import pipeline.explain as explain

    grad_cam = explain.grad_cam

    def tilted(model, x, target, layer, **options):
        logits, cam, extra = grad_cam(model, x, target, layer, **options)
        return logits, cam * (1 + 0.01 * torch.linspace(0, 1, cam.shape[-1], device=cam.device)), extra

    monkeypatch.setattr(explain, "grad_cam", tilted)
    golden = {key: value for key, value in np.load(GOLDEN).items() if key.startswith("label-full/")}
    moved = {line.split(":")[0] for line in differences(golden, extract_small_stores(tmp_path, only="label-full"))}
    assert {f"label-full/teachers/{arch}/{key}" for arch in TEACHERS for key in ("cam", "o_prob")} <= moved, moved
    assert not any(key.split("/")[1] in ("labels", "valid", "view_boxes", "view_flips") for key in moved), moved


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        values = extract_small_stores(Path(folder))
    if GOLDEN.is_file():
        golden = dict(np.load(GOLDEN))
        moved = differences({k: v for k, v in golden.items() if k != "extraction_version"}, values)
        if moved and int(golden["extraction_version"]) == EXTRACTION_VERSION:
            sys.exit(f"the values moved while EXTRACTION_VERSION stayed {EXTRACTION_VERSION}: raise it in "
                     "pipeline/store/layout.py first (stores of the old values become stale), then write again:\n"
                     + "\n".join(moved))
    GOLDEN.parent.mkdir(exist_ok=True)
    np.savez_compressed(GOLDEN, extraction_version=EXTRACTION_VERSION, **values)
    print(f"wrote {GOLDEN}: {len(values)} arrays of extraction version {EXTRACTION_VERSION}")
