"""Cluttered shapes: a second embedded benchmark, of colour images rather than digits.

Each 32x32 RGB image shows one large shape (radius 6-8 px) of its class, in a random
bright colour at a random place, over three small shapes (radius 3-4 px) of other
classes, a random dark colour gradient and Gaussian noise (sigma 0.06). The class is the
large shape's, so a teacher must find it among the distractors. Ten shapes: circle,
square, upward triangle, diamond, X, plus, ring, half disc, downward triangle, hollow
square (not mirror-symmetric as a set: the half disc is the upper half). Everything about
sample i is drawn from a generator seeded by i: 2,000 samples, stratified 60/20/20
train/val/test splits (1,200 / 400 / 400) fixed by `split_seed`.
"""

import numpy as np
from sklearn.model_selection import train_test_split

from pipeline.data.base import ArrayDataset, DatasetInfo, check_split

SIZE, SAMPLES, CLASSES, DISTRACTORS = 32, 2000, 10, 3
RADIUS, DISTRACTOR_RADIUS, NOISE_SIGMA = (6.0, 8.0), (3.0, 4.0), 0.06
GENERATOR_SEED = 20_261_125

INFO = DatasetInfo(
    name="cluttered-shapes",
    num_classes=CLASSES,
    image_shape=(SIZE, SIZE, 3),
    mean=(0.267, 0.267, 0.267),  # of the train split, rounded
    std=(0.231, 0.231, 0.231),
    splits=("train", "val", "test"),
)


def shape_mask(shape: int, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    """Pixels of shape `shape` of radius `r`, given offsets (dy, dx) of every pixel from its centre."""
    d, box, l1 = np.hypot(dy, dx), np.maximum(abs(dy), abs(dx)), abs(dy) + abs(dx)
    if shape == 0:
        return d < r
    if shape == 1:
        return box < 0.8 * r
    if shape == 2:
        return (dy < 0.7 * r) & (abs(dx) < (dy + r) * 0.6)
    if shape == 3:
        return l1 < r
    if shape == 4:
        return (abs(abs(dy) - abs(dx)) < 0.3 * r) & (box < r)
    if shape == 5:
        return ((abs(dy) < 0.3 * r) | (abs(dx) < 0.3 * r)) & (box < r)
    if shape == 6:
        return (d < r) & (d > 0.55 * r)
    if shape == 7:
        return (d < r) & (dy < 0.1 * r)
    if shape == 8:
        return (dy > -0.7 * r) & (abs(dx) < (r - dy) * 0.6)
    return (box < 0.85 * r) & (box > 0.5 * r)


def dark_gradient(rng: np.random.Generator, darkest: float = 0.35) -> np.ndarray:
    """A (SIZE, SIZE, 3) ground that runs from one random dark colour to another (channels below `darkest`)."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    start, end = rng.uniform(0, darkest, 3), rng.uniform(0, darkest, 3)
    along = (np.cos(rng.uniform(0, 2 * np.pi)) * x + np.sin(rng.uniform(0, 2 * np.pi)) * y) / (2 * SIZE) + 0.5
    return start + (end - start) * along[..., None]


def render(index: int, label: int) -> np.ndarray:
    """The float (32, 32, 3) image of sample `index` in [0, 1]."""
    rng = np.random.default_rng([GENERATOR_SEED, index])
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    image = dark_gradient(rng)
    others = [c for c in range(CLASSES) if c != label]
    shapes = [(int(c), DISTRACTOR_RADIUS) for c in rng.choice(others, size=DISTRACTORS)] + [(label, RADIUS)]
    for shape, radius in shapes:  # distractors first: the large shape is drawn whole, on top
        r = rng.uniform(*radius)
        cy, cx = rng.uniform(r, SIZE - r, size=2)
        image[shape_mask(shape, y - cy, x - cx, r)] = rng.uniform(0.45, 1.0, 3)
    return np.clip(image + rng.normal(0, NOISE_SIGMA, image.shape), 0, 1)


def labels() -> np.ndarray:
    """Balanced labels: sample i is of class i mod 10."""
    return np.arange(SAMPLES) % CLASSES


def split_indices(split: str, split_seed: int) -> np.ndarray:
    index, y = np.arange(SAMPLES), labels()
    train, rest = train_test_split(index, test_size=0.4, stratify=y, random_state=split_seed)
    val, test = train_test_split(rest, test_size=0.5, stratify=y[rest], random_state=split_seed)
    return np.sort({"train": train, "val": val, "test": test}[split])


def load(split: str, root: str | None = None, split_seed: int = 0, download: bool = False) -> ArrayDataset:
    """2,000 generated samples; `root` is unused."""
    check_split(INFO, split)
    chosen = split_indices(split, split_seed)
    y = labels()
    images = (np.stack([render(int(i), int(y[i])) for i in chosen]) * 255).round().astype(np.uint8)
    ids = np.array([f"cluttered-shapes-{i:04d}" for i in chosen])
    return ArrayDataset(INFO, split, images, y[chosen], ids)
