"""Geometric augmentation that moves an image and its cached teacher map alike.

One draw gives every sample a translation (dy, dx) and a horizontal flip or not; `apply`
moves any (B, C, H, W) tensor by it, so a teacher map resized to the image size moves
exactly as its image did (logits do not depend on position, so they stay valid).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.data.base import DatasetInfo, standardize, to_unit
from pipeline.errors import PipelineError


@dataclass
class Moves:
    shifts: torch.Tensor  # (B, 2) integer (dy, dx)
    flips: torch.Tensor  # (B,) bool, applied after the shift


class Augmentation:
    """Random translations by up to `max_shift` pixels and, with `flip`, random horizontal flips."""

    def __init__(self, max_shift: int = 0, flip: bool = False, seed: int = 0):
        self.max_shift, self.flip = max_shift, flip
        self.generator = torch.Generator().manual_seed(seed)

    def draw(self, batch_size: int) -> Moves | None:
        """The moves of one batch, or None when there is no augmentation."""
        if not (self.max_shift or self.flip):
            return None
        shifts = torch.randint(-self.max_shift, self.max_shift + 1, (batch_size, 2), generator=self.generator)
        flips = torch.rand(batch_size, generator=self.generator) < 0.5 if self.flip else torch.zeros(batch_size, dtype=torch.bool)
        return Moves(shifts, flips)


def check_flip(flip: bool, info: DatasetInfo) -> None:
    if flip and not info.mirror_symmetric:
        raise PipelineError(f"--flip: the classes of {info.name} are not mirror-symmetric (a mirrored digit is "
                            "another symbol); drop --flip")


def shift(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Translate each (C, H, W) of `x` by its (dy, dx), filling with zeros (black images, empty maps)."""
    pad = int(shifts.abs().max()) if len(shifts) else 0
    if pad == 0:
        return x
    h, w = x.shape[-2:]
    padded = F.pad(x, (pad, pad, pad, pad))
    return torch.stack([padded[i, :, pad - dy:pad - dy + h, pad - dx:pad - dx + w]
                        for i, (dy, dx) in enumerate(shifts.tolist())])


def apply(x: torch.Tensor, moves: Moves) -> torch.Tensor:
    """Move every (C, H, W) of `x` by its sample's shift, then flip it left-right where drawn."""
    x = shift(x, moves.shifts)
    flips = moves.flips.to(x.device)
    return torch.where(flips[:, None, None, None], x.flip(-1), x) if flips.any() else x


def model_input(batch: dict, augmentation: Augmentation | None, mean, std):
    """A store or loader batch -> (standardised (B, C, H, W) input, int64 labels, the moves drawn)."""
    images = to_unit(batch["images"])
    moves = augmentation.draw(len(images)) if augmentation else None
    if moves is not None:
        images = apply(images, moves)
    return standardize(images, mean, std), batch["labels"].long(), moves
