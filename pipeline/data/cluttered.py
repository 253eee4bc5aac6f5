"""Cluttered digits: scikit-learn's digits made hard enough to separate distillation methods.

Each sample is a 48x48 canvas holding its digit, resized to 20x20, at a random position,
three random 8x8 fragments of digits of *other* classes at intensity 0.5-0.7, and Gaussian
noise (sigma 0.05). Everything about sample i is drawn from a generator seeded by i, so
the data set is the same on every machine. Splits: stratified 60/20/20 train/val/test.
"""

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from pipeline.data.base import ArrayDataset, DatasetInfo, check_split

CANVAS, DIGIT, FRAGMENT, FRAGMENTS = 48, 20, 8, 3
FRAGMENT_INTENSITY, NOISE_SIGMA = (0.5, 0.7), 0.05
GENERATOR_SEED = 20_241_125

INFO = DatasetInfo(
    name="cluttered-digits",
    num_classes=10,
    image_shape=(CANVAS, CANVAS, 1),
    mean=(0.087,),  # of the train split
    std=(0.19,),
    splits=("train", "val", "test"),
)


def render(index: int, digits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The float canvas of sample `index` from 20x20 digits in [0, 1]."""
    rng = np.random.default_rng([GENERATOR_SEED, index])
    canvas = np.zeros((CANVAS, CANVAS), np.float32)
    others = np.flatnonzero(labels != labels[index])
    for source in rng.choice(others, size=FRAGMENTS):
        top, left = rng.integers(0, DIGIT - FRAGMENT + 1, size=2)
        piece = digits[source, top:top + FRAGMENT, left:left + FRAGMENT] * rng.uniform(*FRAGMENT_INTENSITY)
        y, x = rng.integers(0, CANVAS - FRAGMENT + 1, size=2)
        canvas[y:y + FRAGMENT, x:x + FRAGMENT] = np.maximum(canvas[y:y + FRAGMENT, x:x + FRAGMENT], piece)
    y, x = rng.integers(0, CANVAS - DIGIT + 1, size=2)
    canvas[y:y + DIGIT, x:x + DIGIT] = np.maximum(canvas[y:y + DIGIT, x:x + DIGIT], digits[index])
    return np.clip(canvas + rng.normal(0, NOISE_SIGMA, canvas.shape), 0, 1)


def split_indices(labels: np.ndarray, split: str, split_seed: int) -> np.ndarray:
    index = np.arange(len(labels))
    train, rest = train_test_split(index, test_size=0.4, stratify=labels, random_state=split_seed)
    val, test = train_test_split(rest, test_size=0.5, stratify=labels[rest], random_state=split_seed)
    return np.sort({"train": train, "val": val, "test": test}[split])


def load(split: str, root: str | None = None, split_seed: int = 0, download: bool = False) -> ArrayDataset:
    """1,797 samples, one per scikit-learn digit; `root` is unused."""
    check_split(INFO, split)
    raw = load_digits()
    pixels = torch.from_numpy(raw.images.astype(np.float32) / 16.0).unsqueeze(1)
    digits = F.interpolate(pixels, size=(DIGIT, DIGIT), mode="bilinear", align_corners=False)[:, 0].clamp(0, 1).numpy()
    chosen = split_indices(raw.target, split, split_seed)
    images = np.stack([render(int(i), digits, raw.target) for i in chosen])
    images = (images * 255).round().astype(np.uint8)[..., None]
    ids = np.array([f"cluttered-digits-{i:04d}" for i in chosen])
    return ArrayDataset(INFO, split, images, raw.target[chosen], ids)
