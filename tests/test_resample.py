"""The device resize of a fractional box (pipeline.resample) against a literal transcription of Pillow's
Resample.c loops, and against the installed Pillow itself."""

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.resample import axis_weights, resize_box, resize_views


def pillow_filter(x: float, interpolation: str) -> float:
    x = abs(x)
    if interpolation == "bilinear":
        return 1.0 - x if x < 1.0 else 0.0
    a = -0.5
    return ((a + 2.0) * x - (a + 3.0)) * x * x + 1 if x < 1.0 else (((x - 5) * x + 8) * x - 4) * a if x < 2.0 else 0.0


def pillow_coeffs(in_size: int, in0: float, in1: float, out_size: int, interpolation: str) -> list[tuple[int, list[int]]]:
    """Resample.c's `precompute_coeffs` and `normalize_coeffs_8bpc`, line by line: per output pixel, its first
    input and the 22-bit weights of its inputs."""
    support = 1.0 if interpolation == "bilinear" else 2.0
    in0, in1 = np.float32(in0), np.float32(in1)  # Pillow parses the box as C floats
    scale = float(np.float32(in1 - in0)) / out_size
    filterscale = max(scale, 1.0)
    support *= filterscale
    ss = 1.0 / filterscale
    result = []
    for xx in range(out_size):
        center = float(in0) + (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        k, ww = [], 0.0
        for x in range(xmax):
            k.append(pillow_filter((x + xmin - center + 0.5) * ss, interpolation))
            ww += k[-1]
        k = [w / ww for w in k] if ww != 0.0 else k
        result.append((xmin, [int(-0.5 + w * (1 << 22)) if w < 0 else int(0.5 + w * (1 << 22)) for w in k]))
    return result


def pillow_loops(pixels: np.ndarray, box, size, interpolation: str) -> np.ndarray:
    """Resample.c's 8-bit passes, pixel by pixel in plain Python (horizontal over the rows the vertical pass
    reads, then vertical): uint8 (H, W, C) -> (h, w, C)."""
    def clip8(value):
        return 255 if value >= 1 << 30 else 0 if value <= 0 else value >> 22

    height, width, channels = pixels.shape
    out_h, out_w = size
    rows = pillow_coeffs(height, box[1], box[3], out_h, interpolation)
    columns = pillow_coeffs(width, box[0], box[2], out_w, interpolation)
    first, last = rows[0][0], rows[-1][0] + len(rows[-1][1])
    middle = [[[clip8((1 << 21) + sum(int(pixels[y, xmin + i, c]) * k for i, k in enumerate(ks)))
                for c in range(channels)] for xmin, ks in columns] for y in range(first, last)]
    return np.array([[[clip8((1 << 21) + sum(middle[ymin - first + i][x][c] * k for i, k in enumerate(ks)))
                       for c in range(channels)] for x in range(out_w)] for ymin, ks in rows], dtype=np.uint8)


def ours(pixels: np.ndarray, box, size, interpolation: str = "bilinear", device: str = "cpu") -> np.ndarray:
    tensor = torch.from_numpy(np.array(pixels)).permute(2, 0, 1).to(device)
    return resize_box(tensor, box, size, interpolation).permute(1, 2, 0).cpu().numpy()


CASES = [  # (image h, w), box (x0, y0, x1, y1), output (h, w): shrinking, enlarging, one of each, a whole image
    ((23, 31), (2.7, 1.25, 29.9, 20.5), (9, 11)),
    ((12, 9), (0.5, 3.3, 8.75, 11.9), (17, 20)),
    ((30, 14), (1.1, 0.0, 13.2, 29.5), (6, 25)),
    ((16, 16), (0, 0, 16, 16), (7, 5)),
]


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("shape, box, size", CASES)
def test_the_resize_is_pillows_loops_to_the_bit(shape, box, size, interpolation):
    pixels = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    expected = pillow_loops(pixels, box, size, interpolation)
    assert np.array_equal(ours(pixels, box, size, interpolation), expected)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_every_weight_is_pillows_integer(interpolation):
    """300 random spans at once (one call, as a batch's views are weighed), each row against Resample.c's."""
    rng = np.random.default_rng(3)
    out_size, length = 37, 300
    in_sizes = rng.integers(2, length + 1, 300)
    spans = np.sort(rng.uniform(0, in_sizes[:, None], (300, 2)), axis=1)
    spans[::5] = np.stack([np.zeros(60), in_sizes[::5]], 1)  # whole axes
    dense = axis_weights(torch.from_numpy(in_sizes), torch.tensor(spans[:, 0], dtype=torch.float32),
                         torch.tensor(spans[:, 1], dtype=torch.float32), out_size, length, interpolation).numpy()
    for weights, in_size, (in0, in1) in zip(dense, in_sizes, spans):
        expected = np.zeros((out_size, length))
        for row, (xmin, ks) in zip(expected, pillow_coeffs(int(in_size), in0, in1, out_size, interpolation)):
            row[xmin:xmin + len(ks)] = ks
        assert np.array_equal(weights, expected)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_a_resize_of_one_pass_is_the_installed_pillows_to_the_bit(interpolation):
    """A box of whole rows (or whole columns) at the image's width (or height) needs one pass, so no
    order of the passes can differ."""
    rng = np.random.default_rng(4)
    pixels = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    for box, size in (((0, 7.3, 120, 81.6), (33, 120)), ((5.5, 0, 101.25, 90), (90, 47)),
                      ((0, 20.5, 120, 40.25), (64, 120))):
        pillow = np.asarray(image.resize(size[::-1], Image.Resampling[interpolation.upper()], box=box))
        assert np.array_equal(ours(pixels, box, size, interpolation), pillow), box


def test_installed_pillows_bilinear_views_are_within_one_level():
    """Pillow 13 (this machine's) rounds some resizes as if the vertical pass came first, which moves a pixel
    by one level at most in bilinear, the views' interpolation: on smooth images as on noise."""
    rng = np.random.default_rng(0)
    for trial in range(40):
        height, width = rng.integers(40, 200, 2)
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        if trial % 2:
            pixels = np.asarray(Image.fromarray(pixels).resize((8, 8)).resize((width, height), Image.BICUBIC))
        box_w, box_h = rng.uniform(0.3, 1.0) * width, rng.uniform(0.3, 1.0) * height
        x0, y0 = rng.uniform(0, width - box_w), rng.uniform(0, height - box_h)
        box, size = (x0, y0, x0 + box_w, y0 + box_h), tuple(int(v) for v in rng.integers(8, 64, 2))
        pillow = np.asarray(Image.fromarray(pixels).resize(size[::-1], Image.BILINEAR, box=box))
        assert np.abs(pillow.astype(int) - ours(pixels, box, size)).max() <= 1, (trial, box, size)


def test_a_batch_of_images_of_their_own_sizes_gives_each_views_resize(monkeypatch):
    """Weights computed for every view of a batch at once, each image its own size, each view its box."""
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((41, 57, 3), (30, 22, 3))]
    boxes = [[(0, 0, 57, 41), (3.5, 2.25, 40.0, 39.5), (10.0, 0.0, 57.0, 20.75)],
             [(0, 0, 22, 30), (1.5, 2.0, 21.0, 29.5), (0.25, 9.0, 12.0, 30.0)]]
    tensors = [torch.from_numpy(i).permute(2, 0, 1) for i in images]
    views = resize_views(tensors, boxes, (16, 24))
    for pixels, image_views, image_boxes in zip(images, views.permute(0, 1, 3, 4, 2).numpy(), boxes):
        for view, box in zip(image_views, image_boxes):
            assert np.array_equal(view, pillow_loops(pixels, box, (16, 24), "bilinear")), box
    monkeypatch.setattr("pipeline.resample.WEIGHT_BYTES", 1)  # every image its own group of weights
    assert torch.equal(resize_views(tensors, boxes, (16, 24)), views)


def test_a_constant_image_stays_constant_and_the_whole_image_at_its_size_is_itself():
    flat = np.full((37, 53, 3), 201, dtype=np.uint8)
    for interpolation in ("bilinear", "bicubic"):
        assert (ours(flat, (3.3, 2.2, 50.1, 30.7), (24, 24), interpolation) == 201).all()
    pixels = np.random.default_rng(1).integers(0, 256, (37, 53, 1), dtype=np.uint8)
    assert np.array_equal(ours(pixels, (0, 0, 53, 37), (37, 53)), pixels)


def test_a_box_outside_the_image_or_an_unknown_interpolation_is_refused():
    pixels = torch.zeros(3, 10, 10, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"box \(-1, 0, 5, 5\) is not inside the 10x10 image"):
        resize_box(pixels, (-1, 0, 5, 5), (4, 4))
    with pytest.raises(ValueError, match="interpolation 'lanczos': choose one of bilinear, bicubic"):
        resize_box(pixels, (0, 0, 5, 5), (4, 4), "lanczos")
    with pytest.raises(ValueError, match="pixels must be uint8, not torch.float32"):
        resize_box(pixels.float(), (0, 0, 5, 5), (4, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_gpu_gives_the_cpus_pixels():
    pixels = np.random.default_rng(2).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    for box in ((0.0, 0.0, 500.0, 375.0), (37.5, 12.25, 401.0, 350.5)):
        assert np.array_equal(ours(pixels, box, (224, 224), device="cuda"), ours(pixels, box, (224, 224)))

