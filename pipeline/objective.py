"""A training step's loss as terms that each know what they average over.

A term is a sum over the rows it covers (all rows for cross-entropy and KD, the rows with a
teacher map for the map term) and the count of those rows. The step's loss is
sum_k weight_k * total_k / count_k. Under torchrun each count is the count over all ranks in
that step, and DDP averages the ranks' gradients, so the loss a rank minimises is that times the
world size: every step's gradient is then the gradient of the mean over all rows all ranks hold,
whatever each rank holds (partial batches, padding steps, maps that count on one rank only).
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Term:
    """`total`: the term summed over what it covers; `count`: how many rows that is; `weight`: its weight in
    the loss (0: logged only)."""

    total: torch.Tensor
    count: torch.Tensor
    weight: float = 1.0

    @classmethod
    def over(cls, values: torch.Tensor, weight: float = 1.0) -> "Term":
        """The term of per-row `values` (B,), all of them counted."""
        return cls(values.sum(), values.new_full((), float(len(values))), weight)  # a fill, no copy to the GPU

    @property
    def mean(self) -> torch.Tensor:
        """The mean over what it covers (0 when it covers nothing)."""
        return self.total / self.count.clamp_min(1)

    def scaled(self, factor: float) -> "Term":
        return Term(self.total * factor, self.count * factor, self.weight)


def loss_of(terms: dict[str, Term], counts: torch.Tensor | None = None) -> torch.Tensor:
    """sum_k weight_k * total_k / count_k; `counts` (one per term, in order) replaces the terms' own counts,
    e.g. with their sums over every rank. A term that covers nothing adds 0 (and keeps the graph)."""
    counts = torch.stack([t.count for t in terms.values()]) if counts is None else counts
    return sum(t.weight * t.total / n.clamp_min(1) for t, n in zip(terms.values(), counts) if t.weight)
