"""Explanation scores and teacher selection: the one home for both (training, reports, `pipeline store info`).

A teacher's explanation of a sample is scored by the Grad-CAM++ confidence drop
max(0, Y - O) / Y (lower is better). Drops within DROP_TIE of the lowest count as equal
(most often several teachers with no drop at all, or one with a drop of 1e-5), and among
those the teacher most confident in the explained class (largest Y) wins, so a teacher can
never win by being unsure of the label: with the unclamped (Y - O) / Y, a 2 %-confident
teacher whose explanation nudged it to 2.1 % outranked a 99 %-confident one with no drop.
"""

import torch
import torch.nn.functional as F

DROP_TIE = 0.01  # drops this close to the lowest are ties, decided by the larger Y

def confidence_drop(y: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """max(0, Y - O) / Y per sample; lower means the map keeps more of the evidence."""
    return torch.clamp(y - o, min=0) / y.clamp_min(1e-12)


def best_explainer(y: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """(B, M) confidences of M teachers -> (B,) index of the teacher with the lowest confidence
    drop; drops within DROP_TIE of the lowest go to the largest Y, then to the first teacher."""
    return lowest_drop(confidence_drop(y, o), y)


def tied_lowest(drop: torch.Tensor) -> torch.Tensor:
    """(B, M) True for the drops within DROP_TIE of the lowest of their row."""
    return drop <= drop.amin(dim=1, keepdim=True) + DROP_TIE


def lowest_drop(drop: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) index of the lowest of (B, M) `drop`, ties (within DROP_TIE) to the largest `y`."""
    return torch.where(tied_lowest(drop), y, torch.full_like(y, -1.0)).argmax(dim=1)


def decided_by_tie(y: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """(B,) True where two or more teachers have the lowest drop (within DROP_TIE), so Y decided."""
    return tied_lowest(confidence_drop(y, o)).sum(dim=1) > 1


def selection_weights(policy: str, y: torch.Tensor, o: torch.Tensor, correct: torch.Tensor,
                      temperature: float = 0.1, random_choice: torch.Tensor | None = None) -> torch.Tensor:
    """(B, M) weights over M teachers per sample.

    per-sample: all weight on `best_explainer`; correct: the same among teachers whose argmax
    is the label (all teachers where none is); weighted: proportional to Y * exp(-drop / temperature),
    so equal drops share by confidence; random: all weight on `random_choice` (B,), a teacher
    drawn per sample independently of any score (the control for the explanation score).
    """
    m = y.shape[1]
    if policy == "random":
        return F.one_hot(random_choice.long(), m).float()
    if policy == "weighted":
        return torch.softmax(y.clamp_min(1e-12).log() - confidence_drop(y, o) / temperature, dim=1)
    if policy == "correct":
        allowed = correct | ~correct.any(dim=1, keepdim=True)
        drop = torch.where(allowed, confidence_drop(y, o), torch.full_like(y, float("inf")))
        return F.one_hot(lowest_drop(drop, y), m).float()
    return F.one_hot(best_explainer(y, o), m).float()
