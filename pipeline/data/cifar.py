"""CIFAR-10 and CIFAR-100 from torchvision's python-pickle layout under the data root.

<root>/cifar-10-batches-py/{data_batch_1..5, test_batch} and
<root>/cifar-100-python/{train, test}; `--download` fetches them with torchvision.
The official training images are split in two: `val`, a seeded random 10 % (5,000:
`np.random.default_rng(split_seed).permutation(50_000)[:5_000]`), held out for choosing
teachers and variants, and `train`, the other 45,000. `test` is the official test set.
"""

import pickle
from functools import partial
from pathlib import Path

import numpy as np

from pipeline.data.base import ArrayDataset, DatasetInfo, check_split
from pipeline.errors import PipelineError

VAL_FRACTION = 0.1  # of the official training images

LAYOUTS = {
    "cifar10": {
        "folder": "cifar-10-batches-py", "train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"],
        "label_key": b"labels", "info": DatasetInfo("cifar10", 10, (32, 32, 3), (0.4914, 0.4822, 0.4465),
                                                     (0.2470, 0.2435, 0.2616), ("train", "val", "test"),
                                                     mirror_symmetric=True),
    },
    "cifar100": {
        "folder": "cifar-100-python", "train": ["train"], "test": ["test"],
        "label_key": b"fine_labels", "info": DatasetInfo("cifar100", 100, (32, 32, 3), (0.5071, 0.4865, 0.4409),
                                                         (0.2673, 0.2564, 0.2762), ("train", "val", "test"),
                                                         mirror_symmetric=True),
    },
}


def load(name: str, split: str, root: str, split_seed: int = 0, download: bool = False) -> ArrayDataset:
    """train (45,000) or val (5,000), both from the official training images and chosen by
    `split_seed`, or the official test split (10,000)."""
    layout = LAYOUTS[name]
    info = layout["info"]
    check_split(info, split)
    folder = find_folder(name, Path(root), download)
    images, labels, ids = [], [], []
    for file in layout["test" if split == "test" else "train"]:
        batch = read_batch(folder / file, layout["label_key"])
        images.append(batch[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[layout["label_key"]], dtype=np.int64))
        ids += [f"{file}:{i}" for i in range(len(labels[-1]))]
    images, labels, ids = np.concatenate(images), np.concatenate(labels), np.array(ids)
    if split != "test":
        order = np.random.default_rng(split_seed).permutation(len(labels))
        held_out = max(1, round(VAL_FRACTION * len(labels)))
        chosen = np.sort(order[:held_out] if split == "val" else order[held_out:])
        images, labels, ids = images[chosen], labels[chosen], ids[chosen]
    return ArrayDataset(info, split, np.ascontiguousarray(images), labels, ids)


def find_folder(name: str, root: Path, download: bool) -> Path:
    """<root>/<folder>, or root itself when it is that folder; downloads first if asked."""
    layout = LAYOUTS[name]
    for folder in (root / layout["folder"], root):
        if folder.name == layout["folder"] and folder.is_dir():
            return folder
    if download:
        import torchvision

        dataset_class = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]
        dataset_class(str(root), download=True)
        return root / layout["folder"]
    files = ", ".join(layout["train"][:1] + ["..."] * (len(layout["train"]) > 1) + layout["test"])
    raise PipelineError(
        f"data set {name} expects torchvision's CIFAR python layout {root}/{layout['folder']}/ ({files}), "
        f"which does not exist; pass --data-root (or set PIPELINE_DATA_ROOT) to the folder holding "
        f"{layout['folder']}/, or add --download"
    )


def read_batch(path: Path, label_key: bytes) -> dict:
    if not path.is_file():
        raise PipelineError(f"{path} is missing; the CIFAR folder {path.parent} is incomplete (re-extract it)")
    try:
        with open(path, "rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        if batch[b"data"].shape[1] != 3072 or len(batch[label_key]) != len(batch[b"data"]):
            raise ValueError("data is not N x 3072 with one label per row")
    except Exception as error:  # a truncated file, another pickle, a text file
        raise PipelineError(f"{path} is not a CIFAR python batch ({type(error).__name__}: {error}); "
                            "re-extract the data set") from None
    return batch


load_cifar10 = partial(load, "cifar10")
load_cifar100 = partial(load, "cifar100")
