"""Geometric augmentation that moves an image and its cached teacher map alike.

One draw gives every sample a translation (dy, dx) and a horizontal flip or not; `apply`
moves any (B, C, H, W) tensor by it, so a teacher map resized to the image size moves
exactly as its image did (logits do not depend on position, so they stay valid).
"""

from dataclasses import dataclass

import torch

from pipeline.data.base import DatasetInfo, standardize, to_unit
from pipeline.errors import PipelineError


@dataclass
class Moves:
    shifts: torch.Tensor  # (B, 2) integer (dy, dx)
    flips: torch.Tensor  # (B,) bool, applied after the shift


class Augmentation:
    """Random translations by up to `max_shift` pixels and, with `flip`, random horizontal flips, drawn by a
    generator on `device`: on a GPU the moves are made there (a captured step takes no host input; pipeline.
    compiled), on the CPU by the CPU generator, so CPU runs and their resumes repeat exactly."""

    def __init__(self, max_shift: int = 0, flip: bool = False, seed: int = 0, device: torch.device = torch.device("cpu")):
        self.max_shift, self.flip, self.device = max_shift, flip, device
        self.generator = torch.Generator(device).manual_seed(seed)

    def draw(self, batch_size: int) -> Moves | None:
        """The moves of one batch, or None when there is no augmentation."""
        if not (self.max_shift or self.flip):
            return None
        shifts = torch.randint(-self.max_shift, self.max_shift + 1, (batch_size, 2), generator=self.generator,
                               device=self.device)
        flips = torch.rand(batch_size, generator=self.generator, device=self.device) < 0.5 if self.flip \
            else torch.zeros(batch_size, dtype=torch.bool, device=self.device)
        return Moves(shifts, flips)


def check_flip(flip: bool, info: DatasetInfo) -> None:
    if flip and not info.mirror_symmetric:
        raise PipelineError(f"--flip: the classes of {info.name} are not mirror-symmetric (a mirrored digit is "
                            "another symbol); drop --flip")


def shift(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Translate each (C, H, W) of `x` by its (dy, dx), filling with zeros (black images, empty maps): output
    pixel (r, c) is input pixel (r - dy, c - dx), gathered, with no host round trip and no shape that depends
    on the draw (so a captured step can hold it)."""
    batch, channels, h, w = x.shape
    shifts = shifts.to(x.device)
    rows = torch.arange(h, device=x.device) - shifts[:, :1]  # (B, h): the input row of each output row
    cols = torch.arange(w, device=x.device) - shifts[:, 1:]
    inside = ((rows >= 0) & (rows < h))[:, None, :, None] & ((cols >= 0) & (cols < w))[:, None, None, :]
    x = x.gather(2, rows.clamp(0, h - 1)[:, None, :, None].expand(batch, channels, h, w))
    x = x.gather(3, cols.clamp(0, w - 1)[:, None, None, :].expand(batch, channels, h, w))
    return torch.where(inside, x, torch.zeros((), dtype=x.dtype, device=x.device))


def apply(x: torch.Tensor, moves: Moves) -> torch.Tensor:
    """Move every (C, H, W) of `x` by its sample's shift, then flip it left-right where drawn."""
    x = shift(x, moves.shifts)
    flips = moves.flips.to(x.device)
    return torch.where(flips[:, None, None, None], x.flip(-1), x)


def model_input(batch: dict, moves: Moves | None, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """A store or loader batch, moved by `moves` (Augmentation.draw) -> (standardised (B, C, H, W) input,
    int64 labels)."""
    images = to_unit(batch["images"])
    if moves is not None:
        images = apply(images, moves)
    return standardize(images, mean, std), batch["labels"].long()
