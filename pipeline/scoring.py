"""Explanation scores and the best explainer: their one home (the policies, reports, `pipeline store info`).

A teacher's explanation of a sample is scored by the Grad-CAM++ confidence drop
max(0, Y - O) / Y (lower is better). Drops within DROP_TIE of the lowest count as equal
(most often several teachers with no drop at all, or one with a drop of 1e-5), and among
those the teacher most confident in the explained class (largest Y) wins, so a teacher can
never win by being unsure of the label: with the unclamped (Y - O) / Y, a 2 %-confident
teacher whose explanation nudged it to 2.1 % outranked a 99 %-confident one with no drop.
"""

import torch

DROP_TIE = 0.01  # drops this close to the lowest are ties, decided by the larger Y


def confidence_drop(y: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """max(0, Y - O) / Y per sample; lower means the map keeps more of the evidence."""
    return torch.clamp(y - o, min=0) / y.clamp_min(1e-12)


def lowest(score: torch.Tensor, y: torch.Tensor, tie: float = DROP_TIE) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, M) scores of M teachers (lower is better) -> (B,) index of the lowest, scores within `tie` of it
    going to the largest `y` (then to the first teacher), and (B,) whether two or more were within `tie`."""
    near = score <= score.amin(dim=1, keepdim=True) + tie
    return torch.where(near, y, torch.full_like(y, -1.0)).argmax(dim=1), near.sum(dim=1) > 1


def best_explainer(y: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """(B, M) confidences of M teachers -> (B,) index of the teacher with the lowest confidence
    drop; drops within DROP_TIE of the lowest go to the largest Y, then to the first teacher."""
    return lowest(confidence_drop(y, o), y)[0]


def decided_by_tie(y: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """(B,) True where two or more teachers have the lowest drop (within DROP_TIE), so Y decided."""
    return lowest(confidence_drop(y, o), y)[1]
