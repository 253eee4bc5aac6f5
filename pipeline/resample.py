"""Pillow's antialiased resize of a fractional box, in exact integers, on any torch device.

A view of an image file is a box resized to a model's input (pipeline.views). Where the
pixels are decoded on a GPU, the resize must happen there too, and every process that cuts a
store's views must get the same pixels. This module is Pillow's algorithm as its Resample.c
writes it (`precompute_coeffs`: the box's edges as float32, weights in double, rounded to
22-bit integers; a horizontal pass, rounded to uint8, then a vertical pass) with each pass one
matrix product in float64: every weight and pixel is an integer and every sum stays below
2^53, so the products are exact in any order of summation, and a CPU and a GPU give the same
integers. A pass Pillow skips (the box spans the whole axis at its size) is the identity here,
which rounds to the same pixels. Where one pass suffices this is Pillow 13's resize to the
bit; where both run, Pillow 13 takes the vertical pass first for some sizes, and its rounding
between the passes then differs: by one level at most in bilinear (the views' interpolation;
tests/test_resample.py), by up to 24 levels on pixel noise and 2 on smooth images in bicubic
(one run of 1,600 random views).
"""

import math

import torch

PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed-point weights for 8-bit images


def bilinear(x: torch.Tensor) -> torch.Tensor:
    x = x.abs()
    return torch.where(x < 1.0, 1.0 - x, 0.0)


def bicubic(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, 0.0))


FILTERS = {"bilinear": (bilinear, 1.0), "bicubic": (bicubic, 2.0)}  # name -> (filter, support)


def axis_weights(in_sizes: torch.Tensor, starts: torch.Tensor, stops: torch.Tensor, out_size: int, length: int,
                 interpolation: str) -> torch.Tensor:
    """float64 (V, out_size, length): for each of V views, the integer weight of input `i` in output `o`
    along one axis, for the span [start, stop) (float32) of an input of `in_sizes` pixels (<= length), as
    Pillow's `precompute_coeffs` and `normalize_coeffs_8bpc` make them: weights computed in double, summed
    tap by tap from the first, each divided by that sum and rounded half away from zero."""
    filter_, support = FILTERS[interpolation]
    device = starts.device
    scale = (stops - starts).double() / out_size  # the float32 difference, as Pillow takes it
    filterscale = scale.clamp(min=1.0)
    ss = 1.0 / filterscale  # Pillow multiplies by the inverse, which rounds otherwise than dividing
    support = support * filterscale
    centers = starts.double()[:, None] + (torch.arange(out_size, dtype=torch.float64, device=device) + 0.5) * scale[:, None]
    xmin = torch.trunc(centers - support[:, None] + 0.5).clamp(min=0)
    xmax = torch.minimum(torch.trunc(centers + support[:, None] + 0.5), in_sizes.double()[:, None]) - xmin
    taps = []
    for tap in range(int(math.ceil(float(support.max()))) * 2 + 1):
        weight = filter_(((tap + xmin) - centers + 0.5) * ss[:, None])
        taps.append(torch.where(tap < xmax, weight, 0.0))
    total = taps[0]
    for weight in taps[1:]:  # left to right, as Pillow's loop sums
        total = total + weight
    divisor = torch.where(total != 0, total, 1.0)
    dense = torch.zeros(len(starts), out_size, length, dtype=torch.float64, device=device)
    for tap, weight in enumerate(taps):
        fixed = weight / divisor * (1 << PRECISION_BITS)
        fixed = torch.where(fixed < 0, torch.trunc(fixed - 0.5), torch.trunc(fixed + 0.5))
        index = (xmin + tap).clamp(max=length - 1).long()  # an unused tap (weight 0) may point anywhere
        dense.scatter_add_(2, index[:, :, None], fixed[:, :, None])
    return dense


def rounded(sums: torch.Tensor) -> torch.Tensor:
    """Resample.c's rounding of a pass: (sum + half) >> PRECISION_BITS, clipped to 0..255."""
    return torch.floor((sums + (1 << (PRECISION_BITS - 1))) / (1 << PRECISION_BITS)).clamp(0, 255)


def check_boxes(boxes: torch.Tensor, heights: torch.Tensor, widths: torch.Tensor) -> None:
    x0, y0, x1, y1 = boxes.unbind(-1)
    inside = (0 <= x0) & (x0 < x1) & (x1 <= widths) & (0 <= y0) & (y0 < y1) & (y1 <= heights)
    if not bool(inside.all()):
        image, view = (int(i) for i in torch.nonzero(~inside)[0])
        box = ", ".join(f"{v:g}" for v in boxes[image, view].tolist())
        raise ValueError(f"box ({box}) is not inside the {int(widths[image, 0])}x{int(heights[image, 0])} image")


WEIGHT_BYTES = 2**28  # a bound on the float64 weights made at once: images are resized in groups under it


def resize_views(images: list[torch.Tensor], boxes, size: tuple[int, int], interpolation: str = "bilinear") -> torch.Tensor:
    """N uint8 images (C, H, W), each its own size, all on one device -> uint8 (N, K, C, h, w) for `size`
    (h, w): image n's K boxes (N, K, 4) (x0, y0, x1, y1), fractional and inside it, resized with
    antialiasing as Resample.c resizes them, on the images' device. The weights of a group of images' views
    are made at once (a few operations per image, not per view), groups bounded by WEIGHT_BYTES (a weight
    matrix spans its group's longest side)."""
    if interpolation not in FILTERS:
        raise ValueError(f"interpolation {interpolation!r}: choose one of {', '.join(FILTERS)}")
    if any(image.dtype != torch.uint8 for image in images):
        raise ValueError(f"pixels must be uint8, not {next(i.dtype for i in images if i.dtype != torch.uint8)}")
    device = images[0].device
    boxes = torch.as_tensor(boxes, dtype=torch.float32, device=device)
    count = boxes.shape[1]
    heights, widths = (torch.tensor([image.shape[axis] for image in images], device=device)[:, None].expand(-1, count)
                       for axis in (1, 2))
    check_boxes(boxes, heights, widths)
    groups, start = [], 0
    while start < len(images):
        stop = start + 1
        while stop < len(images) and weight_bytes(images[start:stop + 1], count, size) <= WEIGHT_BYTES:
            stop += 1
        groups.append(resize_group(images[start:stop], boxes[start:stop], heights[start:stop], widths[start:stop],
                                   size, interpolation))
        start = stop
    return torch.cat(groups)


def weight_bytes(images: list[torch.Tensor], count: int, size: tuple[int, int]) -> int:
    return 8 * len(images) * count * (size[0] * max(i.shape[1] for i in images) + size[1] * max(i.shape[2] for i in images))


def resize_group(images: list[torch.Tensor], boxes: torch.Tensor, heights: torch.Tensor, widths: torch.Tensor,
                 size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """resize_views of a group of images whose weights are made at once (`heights`, `widths`: (N, K), each
    view's image size)."""
    count = boxes.shape[1]
    boxes, heights, widths = boxes.reshape(-1, 4), heights.reshape(-1), widths.reshape(-1)
    rows = axis_weights(heights, boxes[:, 1], boxes[:, 3], size[0], int(heights.max()), interpolation)
    columns = axis_weights(widths, boxes[:, 0], boxes[:, 2], size[1], int(widths.max()), interpolation)
    views = []
    for n, image in enumerate(images):
        height, width = image.shape[1:]
        mine = slice(n * count, (n + 1) * count)
        middle = rounded(torch.einsum("chW,kwW->kchw", image.double(), columns[mine, :, :width]))
        views.append(rounded(torch.einsum("khH,kcHw->kchw", rows[mine, :, :height], middle)))
    return torch.stack(views).to(torch.uint8)


def resize_box(pixels: torch.Tensor, box, size: tuple[int, int], interpolation: str = "bilinear") -> torch.Tensor:
    """uint8 (C, H, W) -> uint8 (C, h, w): one box of one image (resize_views)."""
    return resize_views([pixels], [[box]], size, interpolation)[0, 0]
