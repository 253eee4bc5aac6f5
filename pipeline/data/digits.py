"""scikit-learn's bundled handwritten digits: the embedded default, no download needed."""

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from pipeline.data.base import ArrayDataset, DatasetInfo, check_split

SIZE = 32  # the 8x8 originals are upsampled to CIFAR's resolution
TEST_FRACTION = 0.2  # of all 1,797 images
VAL_FRACTION = 0.2  # of the rest: held out from training, for choosing teachers and variants

INFO = DatasetInfo(
    name="digits",
    num_classes=10,
    image_shape=(SIZE, SIZE, 1),
    mean=(0.3,),
    std=(0.32,),
    splits=("train", "val", "test"),
)


def load(split: str, root: str | None = None, split_seed: int = 0, download: bool = False) -> ArrayDataset:
    """1,797 images: a stratified 20 % test split (360), then a stratified 20 % of the rest as
    validation (288) and the other 1,149 as train, fixed by `split_seed`; `root` is unused."""
    check_split(INFO, split)
    raw = load_digits()
    pixels = torch.from_numpy(raw.images.astype(np.float32) / 16.0).unsqueeze(1)
    resized = F.interpolate(pixels, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    images = (resized.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    index = np.arange(len(raw.target))
    rest, test = train_test_split(index, test_size=TEST_FRACTION, stratify=raw.target, random_state=split_seed)
    train, val = train_test_split(rest, test_size=VAL_FRACTION, stratify=raw.target[rest], random_state=split_seed)
    chosen = np.sort({"train": train, "val": val, "test": test}[split])
    ids = np.array([f"digits-{i:04d}" for i in chosen])
    return ArrayDataset(INFO, split, images[chosen], raw.target[chosen], ids)
