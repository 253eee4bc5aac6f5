"""Maps on a common grid: resized without losing or doubling evidence, and normalised per sample. The student
loss compares teacher and student maps with these, and the `agreement` policy compares teachers' maps."""

import functools

import torch
import torch.nn.functional as F


def resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(..., h, w) -> (..., *size): shrunk by area (each cell the mean of the input over its footprint,
    fractional overlaps weighted, so no evidence is dropped or counted twice), enlarged bilinearly."""
    lead, size = maps.shape[:-2], tuple(size)
    maps = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    (h, w), device = maps.shape[-2:], maps.device
    with torch.autocast(device.type, enabled=False):  # in float32: autocast would multiply in bf16
        if size[0] < h:
            maps = area_weights(h, size[0], device) @ maps
        if size[1] < w:
            maps = maps @ area_weights(w, size[1], device).T
    if tuple(maps.shape[-2:]) != size:
        maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    return maps.reshape(*lead, *size)


@functools.lru_cache(maxsize=64)
def area_weights(inputs: int, outputs: int, device: torch.device) -> torch.Tensor:
    """(outputs, inputs) float32: row r averages the input cells over output cell r's footprint
    [r * inputs / outputs, (r + 1) * inputs / outputs), each cell weighted by its overlap. (torch's
    "area" interpolation is adaptive average pooling, whose windows overlap at full weight when the
    ratio is not a whole number.)"""
    edges = torch.arange(outputs + 1, dtype=torch.float64, device=device) * inputs / outputs  # made where used:
    cells = torch.arange(inputs, dtype=torch.float64, device=device)  # a captured step holds no host tensor
    overlap = torch.minimum(edges[1:, None], cells + 1) - torch.maximum(edges[:-1, None], cells)
    return (overlap.clamp_min(0) * outputs / inputs).float()


def normalize_maps(maps: torch.Tensor, norm: str) -> torch.Tensor:
    """Flattened (..., h*w) maps scaled each: to unit L2 norm (l2) or to mean 1 (mean); zero maps stay zero."""
    if norm == "l2":
        return F.normalize(maps, dim=-1)
    return maps / maps.mean(dim=-1, keepdim=True).clamp_min(1e-12)
