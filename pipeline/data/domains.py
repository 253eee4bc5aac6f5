"""Shape domains: one set of classes drawn three ways, for teachers that are each expert in one way.

The ten classes are the shapes of cluttered-shapes (pipeline.data.shapes), each sample one object of its own:
its own rotation (up to 25 degrees either way), aspect (each axis x0.8 to x1.2), size (radius 6 to 9 px), place
(wholly inside the image) and colours, drawn from a generator seeded by the sample's index, so no object is ever
drawn twice and the splits share none. The domain (the way of drawing, the sample's group) follows the index:
- `solid`: the shape filled in a bright colour over a dark colour gradient;
- `outline`: only the shape's border, a dark stroke about 2 px wide, on a light background;
- `texture`: the shape told only by its texture: stripes of two colours (at a random angle) inside, the
  flat mean of the two colours outside, so the shape is about as bright as its ground.
32x32 RGB, Gaussian noise (sigma 0.05). 7,200 samples, a third of each domain and a tenth of each class,
split stratified by class and domain into train 3,600, val 1,200 and test 2,400 (fixed by `split_seed`).
"""

import numpy as np
from sklearn.model_selection import train_test_split

from pipeline.data.base import ArrayDataset, DatasetInfo, check_split
from pipeline.data.shapes import CLASSES, dark_gradient, shape_mask

SIZE, SAMPLES, NOISE_SIGMA = 32, 7200, 0.05
DOMAINS = ("solid", "outline", "texture")
RADIUS, STROKE, ROTATION, ASPECT = (6.0, 9.0), 2.0, np.deg2rad(25), (0.8, 1.2)  # the largest fits: 9 * 1.2 * 1.42 < 32
VAL_FRACTION, TEST_FRACTION = 1 / 6, 1 / 3
GENERATOR_SEED = 20_261_205

INFO = DatasetInfo(
    name="shape-domains",
    num_classes=CLASSES,
    image_shape=(SIZE, SIZE, 3),
    mean=(0.505, 0.505, 0.505),  # of the train split, rounded
    std=(0.303, 0.303, 0.303),
    splits=("train", "val", "test"),
)


def object_mask(rng: np.random.Generator, label: int, radius: float) -> np.ndarray:
    """The (SIZE, SIZE) mask of one object of class `label`: the class's shape turned and stretched at random,
    then placed at random where it lies wholly inside the image."""
    side = 2 * SIZE  # room for any turn and stretch of the largest shape
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) - side / 2
    angle, (sy, sx) = rng.uniform(-ROTATION, ROTATION), rng.uniform(*ASPECT, size=2)
    cos, sin = np.cos(angle), np.sin(angle)
    drawn = shape_mask(label, (cos * y - sin * x) / sy, (sin * y + cos * x) / sx, radius)
    rows, cols = np.flatnonzero(drawn.any(1)), np.flatnonzero(drawn.any(0))
    shape = drawn[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    top, left = (int(rng.integers(0, SIZE - extent + 1)) for extent in shape.shape)
    mask = np.zeros((SIZE, SIZE), bool)
    mask[top:top + shape.shape[0], left:left + shape.shape[1]] = shape
    return mask


def border(mask: np.ndarray) -> np.ndarray:
    """The pixels of `mask` within STROKE pixels (city-block) of a pixel outside it."""
    inside = mask.copy()
    for _ in range(int(STROKE)):
        padded = np.pad(inside, 1)
        inside = inside & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inside


def render(index: int, label: int, domain: int) -> np.ndarray:
    """The float (SIZE, SIZE, 3) image of sample `index` in [0, 1]."""
    rng = np.random.default_rng([GENERATOR_SEED, index])
    mask = object_mask(rng, label, rng.uniform(*RADIUS))
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    if DOMAINS[domain] == "solid":
        image = dark_gradient(rng, 0.3)
        image[mask] = rng.uniform(0.55, 1.0, 3)
    elif DOMAINS[domain] == "outline":
        image = np.broadcast_to(rng.uniform(0.7, 1.0, 3), (SIZE, SIZE, 3)).copy()
        image[border(mask)] = rng.uniform(0.0, 0.3, 3)
    else:
        period, phase, turn = rng.uniform(3.0, 5.0), rng.uniform(0, 2 * np.pi), rng.uniform(0, np.pi)
        light, dark = rng.uniform(0.6, 1.0, 3), rng.uniform(0.0, 0.4, 3)
        stripes = np.sin((np.cos(turn) * x + np.sin(turn) * y) * 2 * np.pi / period + phase) > 0
        image = np.where(mask[..., None], np.where(stripes[..., None], light, dark), (light + dark) / 2)
    return np.clip(image + rng.normal(0, NOISE_SIGMA, image.shape), 0, 1)


def labels_and_domains() -> tuple[np.ndarray, np.ndarray]:
    """Sample i is of class i mod 10 and of domain (i div 10) mod 3: every class x domain cell alike."""
    index = np.arange(SAMPLES)
    return index % CLASSES, (index // CLASSES) % len(DOMAINS)


def split_indices(split: str, split_seed: int) -> np.ndarray:
    y, domain = labels_and_domains()
    cell, index = y * len(DOMAINS) + domain, np.arange(SAMPLES)
    rest, test = train_test_split(index, test_size=TEST_FRACTION, stratify=cell, random_state=split_seed)
    train, val = train_test_split(rest, test_size=VAL_FRACTION / (1 - TEST_FRACTION), stratify=cell[rest],
                                  random_state=split_seed)
    return np.sort({"train": train, "val": val, "test": test}[split])


def load(split: str, root: str | None = None, split_seed: int = 0, download: bool = False) -> ArrayDataset:
    """7,200 generated samples, each with its domain as its group; `root` is unused."""
    check_split(INFO, split)
    chosen = split_indices(split, split_seed)
    y, domain = labels_and_domains()
    images = np.stack([render(int(i), int(y[i]), int(domain[i])) for i in chosen])
    ids = np.array([f"shape-domains-{i:04d}" for i in chosen])
    return ArrayDataset(INFO, split, (images * 255).round().astype(np.uint8), y[chosen], ids,
                        groups=np.array(DOMAINS)[domain[chosen]])
