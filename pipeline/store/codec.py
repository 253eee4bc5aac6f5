"""Stored values to tensors and back: quantised Grad-CAM maps and the two logits modes."""

import math

import numpy as np
import torch

from pipeline.store.layout import teacher_array


def quantize_cam(cam: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(B, h, w) float maps -> uint8 maps whose max is 255, and the per-sample scale (0: empty map)."""
    scale = cam.flatten(1).amax(1).float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    u8 = torch.where(scale[:, None, None] > 0, cam.float() / safe[:, None, None] * 255, torch.zeros_like(cam.float()))
    return u8.round().clamp(0, 255).to(torch.uint8).cpu().numpy(), scale.cpu().numpy().astype(np.float32)


def dequantize_cam(cam: np.ndarray | torch.Tensor, scale: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(..., h, w) uint8 maps and their (...) scales -> float maps."""
    cam, scale = torch.as_tensor(cam), torch.as_tensor(scale)
    return cam.float() / 255 * scale.float().reshape(*scale.shape, *([1] * (cam.dim() - scale.dim())))


def full_logits(rows: dict, name: str, num_classes: int) -> torch.Tensor:
    """(B, C) float32 logits of teacher `name` from store rows of either logits mode.

    Top-k rows are restored to a full vector: the K stored (float16) logits, and every other
    class at the logit that gives it an equal share of the tail, whose log-mass
    `tail_logsumexp` (the log-sum-exp of the C - K other logits) was computed at extraction
    from the float32 logits. The softmax of the result is exact at T = 1 for the top K and
    for the total of the rest, up to the float16 rounding of the K values, for any row:
    nothing is computed as 1 minus a sum, which cancels on confident rows.
    """
    values = torch.as_tensor(rows[teacher_array(name, "logits")]).float()
    if teacher_array(name, "logit_classes") not in rows:
        return values
    classes = torch.as_tensor(rows[teacher_array(name, "logit_classes")]).long()
    tail = torch.as_tensor(rows[teacher_array(name, "tail_logsumexp")]).float()
    fill = tail - math.log(num_classes - values.shape[1])
    return fill[:, None].repeat(1, num_classes).scatter(1, classes, values)


def topk_logit_fields(logits: torch.Tensor, k: int) -> dict[str, np.ndarray]:
    """float32 logits (B, C) -> the top-k store arrays: the K largest (float16), their classes, and
    the log-sum-exp of the other C - K logits (float32), the tail's log-mass that `full_logits` uses."""
    values, classes = logits.topk(k, dim=1)
    tail = logits.float().scatter(1, classes, float("-inf"))
    return {"logits": values.half().numpy(), "logit_classes": classes.numpy(),
            "tail_logsumexp": torch.logsumexp(tail, dim=1).numpy()}


def cached_predictions(rows: dict, name: str, num_classes: int) -> np.ndarray:
    return full_logits(rows, name, num_classes).argmax(1).numpy()
