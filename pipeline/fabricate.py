"""Fabricated inputs for tests, `pipeline bench` and benchmarks/: untrained teacher checkpoints, CIFAR files of
random images (no weights or data sets can be downloaded where they run), and an S3 API on localhost (moto's
server, from the dev extra) for stores in a bucket."""

import os
import pickle
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from pipeline.data import get_dataset
from pipeline.models import create_model
from pipeline.models.checkpoint import save_checkpoint


def make_teacher(path: Path, arch: str, seed: int = 0, zero_head: bool = False, dataset: str = "digits",
                 data_root: Path | None = None) -> Path:
    """Save an untrained teacher checkpoint of `arch` for `dataset`; `zero_head` zeroes its last Linear."""
    torch.manual_seed(seed)
    info = get_dataset(dataset, "test", data_root and str(data_root)).info
    model = create_model(arch, info.image_shape[2], info.num_classes)
    if zero_head:
        last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        torch.nn.init.zeros_(last.weight)
        torch.nn.init.zeros_(last.bias)
    save_checkpoint(path, model, {
        "name": arch, "arch": arch, "in_channels": info.image_shape[2], "num_classes": info.num_classes,
        "transform": {"mean": list(info.mean), "std": list(info.std)}, "metrics": {"top1": 0.5, "val_top1": 0.5},
    })
    return path


def make_torchvision_teacher(path: Path, arch: str, num_classes: int, seed: int = 0) -> Path:
    """A torchvision architecture with random weights, saved as this project's checkpoint."""
    torch.manual_seed(seed)
    model = create_model(f"torchvision:{arch}", 3, num_classes)
    save_checkpoint(path, model, {
        "name": arch, "arch": f"torchvision:{arch}", "in_channels": 3, "num_classes": num_classes,
        "transform": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}, "metrics": {"top1": 0.5, "val_top1": 0.5},
    })
    return path


def make_cifar(root: Path, name: str = "cifar10", per_batch: int = 4, seed: int = 0) -> Path:
    """torchvision's CIFAR python layout with `per_batch` random images in every batch file."""
    rng = np.random.default_rng(seed)
    folder, files, key, classes = {
        "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels", 10),
        "cifar100": ("cifar-100-python", ["train", "test"], b"fine_labels", 100),
    }[name]
    (root / folder).mkdir(parents=True, exist_ok=True)
    for file in files:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 key: rng.integers(0, classes, per_batch).tolist(),
                 b"filenames": [f"img_{i}.png".encode() for i in range(per_batch)]}
        with open(root / folder / file, "wb") as handle:
            pickle.dump(batch, handle)
    return root


def free_port() -> int:
    """A TCP port of localhost that no one listens on now."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        return listener.getsockname()[1]


@contextmanager
def local_s3(bucket: str = "stores") -> Iterator[str]:
    """s3://<bucket> on a moto server started here on a free port, with the environment a user sets for a bucket
    (endpoint, keys, region; every other AWS_ variable out of the way, so nothing reaches a real endpoint) while it
    runs; the server stops after, and the clients opened meanwhile are dropped."""
    from pipeline.store.location import forget_buckets

    command = shutil.which("moto_server")
    if command is None:
        raise RuntimeError("moto_server is not installed: pip install 'moto[server]' (the dev extra has it)")
    port = free_port()
    server = subprocess.Popen([command, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    endpoint, deadline = f"http://127.0.0.1:{port}", time.time() + 30
    saved = {key: value for key, value in os.environ.items() if key.startswith("AWS_")}
    try:
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError(f"moto_server did not start on {endpoint}") from None
                time.sleep(0.1)
        for key in saved:
            del os.environ[key]
        os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{bucket}", method="PUT"))  # create the bucket
        yield f"s3://{bucket}"
    finally:
        for key in [key for key in os.environ if key.startswith("AWS_")]:
            del os.environ[key]
        os.environ.update(saved)
        forget_buckets()
        server.terminate()
        server.wait(timeout=10)
