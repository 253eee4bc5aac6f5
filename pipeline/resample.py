"""Pillow's antialiased resize of a fractional box, in integers, on any torch device.

A view of an image file is a box resized to a model's input (pipeline.views). Where the
pixels are decoded on a GPU, the resize must happen there too, and every process that cuts a
store's views must get the same pixels. This module is Pillow's algorithm as its Resample.c
writes it (`precompute_coeffs`, 22-bit fixed-point weights, a horizontal pass over the rows
the vertical pass needs, rounded to uint8, then the vertical pass) as gathers and integer
sums: the same integers on a CPU and a GPU. Where one pass suffices it is Pillow 13's resize
to the bit; where both run, Pillow 13 takes the vertical pass first for some sizes, and its
rounding between the passes then differs: by one level at most in bilinear (the views'
interpolation; tests/test_resample.py), by up to 24 levels on pixel noise and 2 on smooth
images in bicubic (one run of 1,600 random views).
"""

import math

import numpy as np
import torch

PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed-point weights for 8-bit images


def bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def bicubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


FILTERS = {"bilinear": (bilinear, 1.0), "bicubic": (bicubic, 2.0)}  # name -> (filter, support)


def coefficients(in_size: int, in0: np.float32, in1: np.float32, out_size: int,
                 interpolation: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first input index, number of inputs, integer weights (out_size, ksize)) of each output pixel, as Pillow's
    `precompute_coeffs` and `normalize_coeffs_8bpc` make them: the box's edges are float32 (Pillow
    parses them so), the weights are computed in double and rounded half away from zero. A tap past an
    output pixel's last input has weight 0 and points at its first input."""
    filter_, support = FILTERS[interpolation]
    scale = float(np.float32(in1 - in0)) / out_size
    filterscale = max(scale, 1.0)
    ss = 1.0 / filterscale  # Pillow multiplies by the inverse, which rounds otherwise than dividing
    support *= filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    centers = float(in0) + (np.arange(out_size) + 0.5) * scale
    xmin = np.maximum(np.trunc(centers - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(centers + support + 0.5), in_size).astype(np.int64) - xmin
    taps = np.arange(ksize)
    used = taps[None, :] < xmax[:, None]
    weights = np.where(used, filter_((taps[None, :] + xmin[:, None] - centers[:, None] + 0.5) * ss), 0.0)
    total = np.add.accumulate(weights, axis=1)[:, -1:]  # summed left to right, as Pillow's loop does
    weights = np.divide(weights, total, out=weights, where=total != 0)
    fixed = weights * (1 << PRECISION_BITS)
    fixed = np.where(fixed < 0, np.trunc(fixed - 0.5), np.trunc(fixed + 0.5)).astype(np.int64)
    return xmin, xmax, np.where(used, fixed, 0)


def resample_axis(pixels: torch.Tensor, axis: int, first: np.ndarray, weights: np.ndarray) -> torch.Tensor:
    """One pass along `axis` of int64 pixels: each output the rounded, clipped sum of its taps."""
    device = pixels.device
    index = torch.as_tensor(np.minimum(first[:, None] + np.arange(weights.shape[1]), pixels.shape[axis] - 1),
                            device=device)
    weights = torch.as_tensor(weights, device=device)
    total = torch.full((), 1 << (PRECISION_BITS - 1), dtype=torch.int64, device=device)
    shape = [1] * pixels.dim()
    shape[axis] = -1
    for tap in range(weights.shape[1]):
        total = total + pixels.index_select(axis, index[:, tap]) * weights[:, tap].view(shape)
    return torch.clamp(total >> PRECISION_BITS, 0, 255)


def resize_box(pixels: torch.Tensor, box, size: tuple[int, int], interpolation: str = "bilinear") -> torch.Tensor:
    """uint8 (C, H, W) -> uint8 (C, h, w) for `size` (h, w): the box (x0, y0, x1, y1), fractional and
    inside the image, resized with antialiasing as Resample.c resizes it, on the pixels' device."""
    if interpolation not in FILTERS:
        raise ValueError(f"interpolation {interpolation!r}: choose one of {', '.join(FILTERS)}")
    if pixels.dtype != torch.uint8:
        raise ValueError(f"pixels must be uint8, not {pixels.dtype}")
    height, width = pixels.shape[1:]
    out_h, out_w = size
    x0, y0, x1, y1 = (np.float32(v) for v in box)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"box {tuple(box)} is not inside the {width}x{height} image")
    horizontal = out_w != width or x0 != 0 or x1 != out_w
    vertical = out_h != height or y0 != 0 or y1 != out_h
    if not (horizontal or vertical):
        return pixels.clone()
    row_first, row_count, row_weights = coefficients(height, y0, y1, out_h, interpolation)
    top, bottom = int(row_first[0]), int(row_first[-1] + row_count[-1])  # the rows the vertical pass reads
    out = pixels[:, top:bottom].to(torch.int64)
    if horizontal:
        column_first, column_count, column_weights = coefficients(width, x0, x1, out_w, interpolation)
        left, right = int(column_first[0]), int(column_first[-1] + column_count[-1])
        out = resample_axis(out[:, :, left:right], 2, column_first - left, column_weights)
    if vertical:
        out = resample_axis(out, 1, row_first - top, row_weights)
    return out.to(torch.uint8)
