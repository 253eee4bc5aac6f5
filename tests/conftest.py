"""Shared helpers: the CLI, teacher checkpoints with random weights, and whole-store comparison."""

import _openmp  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch loads OpenMP)
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.distill import DistillationLoss, LossSettings
from pipeline.fabricate import make_cifar, make_teacher, make_torchvision_teacher  # noqa: F401 (the tests' helpers too)
from pipeline.methods import method_of
from pipeline.policies import POLICIES
from pipeline.store.location import location
from pipeline.train import Resume


class Killed(BaseException):
    """What tests raise where a real run would be killed: right after a training state was saved."""


def save_then_die(kill_at_save: int, saves: list):
    """A Resume.save that saves, records each saved position in `saves`, and raises Killed at save
    number `kill_at_save` (0: never)."""
    original = Resume.save

    def save(self, state):
        original(self, state)
        saves.append(state["position"])
        if len(saves) == kill_at_save:
            raise Killed

    return save


def invoke(*args, exit_code=0):
    """Run `pipeline ARGS` in-process; the exit code must be `exit_code`."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == exit_code, result.output
    return result


def extract_args(teachers, store, *extra, block_size=32):
    """`pipeline extract-teachers` of `teachers` into `store` (a list for `invoke`), small blocks."""
    return ["extract-teachers", "--teachers", ",".join(map(str, teachers)), "--store", store,
            "--block-size", block_size, *extra]


@pytest.fixture(scope="session", autouse=True)
def forkserver_preload():
    """Processes started with forkserver (stage two's DataLoader workers, test_ddp's ranks) fork from one server
    that has imported torch and the library once, instead of each importing them anew (seconds of CPU each).
    They are still processes of their own, and what they run is unchanged; only the imports are done before.
    The server starts now and imports while the first tests run (nothing waits for it until a test forks)."""
    import multiprocessing
    import multiprocessing.forkserver

    multiprocessing.set_forkserver_preload(["torch", "pipeline.student", "pipeline.stream", "pipeline.ddp"])
    multiprocessing.forkserver.ensure_running()


@pytest.fixture(scope="session")
def teachers(tmp_path_factory):
    """Untrained resnet8_slim and vgg8_bn digits checkpoints (closed-form and autograd Grad-CAM paths)."""
    root = tmp_path_factory.mktemp("teachers")
    return [make_teacher(root / "resnet8_slim.pt", "resnet8_slim"), make_teacher(root / "vgg8_bn.pt", "vgg8_bn")]


@pytest.fixture(scope="session")
def digits_test_store(teachers, tmp_path_factory):
    """`teachers` extracted from digits' test split (360 images, 12 blocks of 32), made once for the modules that
    read it and never change it (test_ddp's small store, test_cluster's serial one, test_store_integrity's clean
    one: the same command in each)."""
    store = tmp_path_factory.mktemp("digits-test") / "store.zarr"
    invoke(*extract_args(teachers, store, "--split", "test"))
    return store


_REFERENCES: dict[Path, tuple[tuple, dict[str, np.ndarray]]] = {}


def reference_arrays(path: Path) -> dict[str, np.ndarray]:
    """store_arrays(path), read anew only when a file of the store has changed (size or mtime) since the last
    read: the clean store a module compares many stores with is read once, not at every comparison."""
    path = Path(path)
    files = []
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = file.stat()
        files.append((str(file), stat.st_size, stat.st_mtime_ns))
    cached = _REFERENCES.get(path)
    if cached is None or cached[0] != tuple(files):
        cached = _REFERENCES[path] = (tuple(files), store_arrays(path))
    return cached[1]


def store_arrays(path: Path | str) -> dict[str, np.ndarray]:
    """Every array of a Zarr store by its path or URL, read with plain zarr."""
    group = zarr.open_group(location(path).zarr_store(read_only=True), mode="r")
    return {name: array[...] for name, array in group.arrays()} | {
        f"teachers/{t}/{name}": array[...]
        for t, teacher in group["teachers"].groups() for name, array in teacher.arrays()
    }


def assert_same_store(a: Path, b: Path) -> None:
    """Every array of store `a` equals, in values and dtype, that of store `b` (the reference: read once)."""
    left, right = store_arrays(a), reference_arrays(b)
    assert sorted(left) == sorted(right)
    for name in left:
        np.testing.assert_array_equal(left[name], right[name], err_msg=name)
        assert left[name].dtype == right[name].dtype, name


# -- fabricated real-world layouts -------------------------------------------------------

IMAGENET_WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475"]


def make_imagenet(root: Path, classes=IMAGENET_WNIDS[1:4], train_per_class: int = 3, val_per_class: int = 1,
                  meta: bool = True, corrupt: bool = False, sides: tuple[int, int] = (180, 400)) -> Path:
    """A tiny ImageNet tree of real JPEGs (each side drawn from `sides`); `meta` writes torchvision's
    meta.bin for all five IMAGENET_WNIDS, `corrupt` adds one unreadable train/<first class>/zz_corrupt.JPEG."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c, wnid in enumerate(classes):
            (root / split / wnid).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = int(rng.integers(*sides)), int(rng.integers(*sides))
                pixels = (rng.random((h, w, 3)) * 60 + np.array([60 * c, 120, 200 - 60 * c])).clip(0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / wnid / f"{wnid}_{i:04d}.JPEG")
    if corrupt:
        (root / "train" / classes[0] / "zz_corrupt.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    if meta:
        torch.save(({w: (f"class {w}",) for w in IMAGENET_WNIDS}, []), root / "meta.bin")
    return root


def distillation(method: str, teachers: list[str], layer, *, mean=(0.3,), std=(0.32,), num_classes: int = 10,
                 augmentation=None, kd_teacher=None, target="label", policy="per-sample", drawn=None, **settings):
    """The student loss of `method` on the tests' one-channel batches; `settings` go over LossSettings' defaults
    (temperature 4, alpha 1, beta 0). A method that follows a policy gets `policy`, with `drawn` (N,) as its
    teacher of each store row where it draws one."""
    chosen = POLICIES.get(policy)() if method_of(method).follows_policy else None
    if drawn is not None:
        chosen.drawn = drawn
    return DistillationLoss(method_of(method), teachers, layer, mean, std, num_classes, LossSettings(**settings),
                            augmentation=augmentation, kd_teacher=kd_teacher, target=target, policy=chosen)
