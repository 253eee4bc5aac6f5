"""Selection policies: how each sample's weight over the teachers is chosen, one class each.

A policy turns a batch's evidence (pipeline.evidence: the teachers' confidences Y and O, whether each is right,
their cached maps) into (B, M) weights over the M teachers: the student's logit target is their weighted mix,
and its map target the weighted mix of their maps. `POLICIES` lists them; `--policy` takes their names, and
`pipeline store selection` shows what each chooses on a store. `per-sample`, the lowest confidence drop, is the
thesis; the others are controls (random, random-batch, confident, confidence-weighted, correct) or other
explanation scores that could earn its place (drop-z, drop-rank, masked, agreement).
"""

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import PipelineError
from pipeline.evidence import Evidence, store_evidence
from pipeline.maps import resize_maps
from pipeline.registry import Registry
from pipeline.scoring import DROP_TIE, confidence_drop, lowest


class Policy:
    """What every policy answers; `one_teacher` and `mixes_maps` say how a run must treat it."""

    name = ""
    help = ""
    one_teacher = False  # the run learns from one teacher, chosen before training
    mixes_maps = False  # a sample's weight may spread over teachers (maps of different classes, on a predicted store)

    def __init__(self, temperature: float = 0.1):
        if not temperature > 0:  # t 0 gives NaN weights, a negative t rewards the largest drops
            raise PipelineError(f"--policy-temperature must be above 0; got {temperature}")
        self.temperature = temperature  # --policy-temperature (`weighted`)

    def fit(self, store, teachers: list[str], seed: int, blocks: list[int] | None = None) -> "Policy":
        """Take what the policy needs of the whole store (statistics over the rows of `blocks`, default: those every
        teacher finished; a seeded draw per row)."""
        return self

    def to(self, device: torch.device) -> "Policy":
        """What `fit` took, moved to the device the student trains on (a captured step holds no host tensor)."""
        return self

    def teachers(self, store, teachers: list[str]) -> list[str]:
        """The teachers the run learns from, of the store's `teachers`."""
        return teachers

    def weights(self, evidence: Evidence) -> torch.Tensor:
        """(B, M) weights over the teachers, each row summing to 1."""
        return F.one_hot(self.choice(evidence)[0], evidence.y.shape[1]).float()

    def choice(self, evidence: Evidence) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) the teacher each row follows and (B,) whether a tie of the score decided it (by the larger Y)."""
        raise NotImplementedError


class Lowest(Policy):
    """Per sample, the teacher with the lowest `score` (B, M); scores within `tie` of the lowest go to the larger Y."""

    tie = 0.0

    def score(self, evidence: Evidence) -> torch.Tensor:
        raise NotImplementedError

    def choice(self, evidence):
        return lowest(self.score(evidence), evidence.y, self.tie)


def no_ties(evidence: Evidence) -> torch.Tensor:
    """(B,) False on the evidence's device: for policies that choose by no score."""
    return torch.zeros_like(evidence.y[:, 0], dtype=torch.bool)


POLICIES: Registry[type[Policy]] = Registry("policy")


@POLICIES.add
class PerSample(Lowest):
    name = "per-sample"
    help = "per sample, the teacher with the lowest confidence drop (ties to the larger Y): the thesis"
    tie = DROP_TIE

    def score(self, evidence):
        return confidence_drop(evidence.y, evidence.o)


@POLICIES.add
class Global(Policy):
    name = "global"
    help = "the one teacher with the lowest mean drop over the store"
    one_teacher = True

    def teachers(self, store, teachers):
        from pipeline.store.info import teacher_table  # reads the whole store once

        return [teacher_table(store).set_index("teacher")["mean_drop"].idxmin()]

    def choice(self, evidence):
        return torch.zeros_like(evidence.y[:, 0], dtype=torch.long), no_ties(evidence)


class Soft(Policy):
    """Weights proportional to Y, times exp(-`penalty` / t) where there is a penalty: a mix, whose argmax is its
    choice."""

    mixes_maps = True

    def penalty(self, evidence: Evidence) -> torch.Tensor | None:
        raise NotImplementedError

    def weights(self, evidence):
        scores, penalty = evidence.y.clamp_min(1e-12).log(), self.penalty(evidence)
        return torch.softmax(scores if penalty is None else scores - penalty / self.temperature, dim=1)

    def choice(self, evidence):
        return self.weights(evidence).argmax(1), no_ties(evidence)


@POLICIES.add
class Weighted(Soft):
    name = "weighted"
    help = "weights proportional to Y * exp(-drop / t), t = --policy-temperature"

    def penalty(self, evidence):
        return confidence_drop(evidence.y, evidence.o)


@POLICIES.add
class ConfidenceWeighted(Soft):
    """`weighted` without its drop factor: whether `weighted` owes its choices to the explanation or to Y."""

    name = "confidence-weighted"
    help = "weights proportional to Y: weighted without the drop (a control)"

    def penalty(self, evidence):
        return None


@POLICIES.add
class Correct(Lowest):
    name = "correct"
    help = "per sample, the lowest drop among the teachers that classify it correctly (all, where none does)"
    tie = DROP_TIE

    def score(self, evidence):
        allowed = evidence.correct | ~evidence.correct.any(dim=1, keepdim=True)
        return torch.where(allowed, confidence_drop(evidence.y, evidence.o), torch.full_like(evidence.y, float("inf")))


@POLICIES.add
class Confident(Lowest):
    name = "confident"
    help = "per sample, the teacher most confident in the explained class (largest Y): no explanation"

    def score(self, evidence):
        return -evidence.y


@POLICIES.add
class Masked(Lowest):
    name = "masked"
    help = "per sample, the teacher most confident on its explanation-masked image alone (largest O)"

    def score(self, evidence):
        return -evidence.o


class Drawn(Policy):
    """A seeded, uniformly random teacher for every store row (`draws`)."""

    drawn: torch.Tensor | None = None

    def fit(self, store, teachers, seed, blocks=None):
        self.drawn = draws(store.num_samples, len(teachers), seed)
        return self

    def choice(self, evidence):
        if self.drawn is None:
            raise RuntimeError(f"the {self.name} policy draws its teachers in `fit`, which was not called")
        return self.rows_teacher(evidence.rows), no_ties(evidence)

    def rows_teacher(self, rows: torch.Tensor) -> torch.Tensor:
        return self.drawn[rows]

    def to(self, device: torch.device) -> "Drawn":
        self.drawn = self.drawn.to(device)
        return self


@POLICIES.add
class Random(Drawn):
    name = "random"
    help = "per sample a seeded, uniformly random teacher: the control for the explanation score"


@POLICIES.add
class RandomBatch(Drawn):
    name = "random-batch"
    help = "per batch a seeded, uniformly random teacher for all its samples (MEAL's choice)"

    def rows_teacher(self, rows):
        return self.drawn[rows[:1]].expand(len(rows))  # the draw of the batch's first row: batches are shuffled


class PerTeacherDrop(Lowest):
    """The drop measured against the teacher's own drops over the store, which removes an architecture's offset
    (one net's drops can sit far above another's whatever the sample)."""

    drops: list[torch.Tensor] | None = None  # each teacher's sorted drops over the store's eval view

    def fit(self, store, teachers, seed, blocks=None):
        blocks = [confidence_drop(e.y, e.o) for e in store_evidence(store, teachers, blocks=blocks)]
        rows = sum(len(block) for block in blocks)
        if rows < 2:
            raise PipelineError(f"the {self.name} policy measures each teacher's drops over the store's finished "
                                f"rows, and store {store.location} has {rows}; finish it with its `pipeline "
                                "extract-teachers` command")
        self.drops = [column.sort().values for column in torch.cat(blocks).T]
        return self

    def score(self, evidence):
        if self.drops is None:
            raise RuntimeError(f"the {self.name} policy measures the store in `fit`, which was not called")
        drop = confidence_drop(evidence.y, evidence.o)
        return torch.stack([self.within(drop[:, m].contiguous(), sorted_drops)
                            for m, sorted_drops in enumerate(self.drops)], 1)

    def to(self, device: torch.device) -> "PerTeacherDrop":
        self.drops = [sorted_drops.to(device) for sorted_drops in self.drops]
        return self

    def within(self, drop: torch.Tensor, sorted_drops: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@POLICIES.add
class DropZ(PerTeacherDrop):
    name = "drop-z"
    help = "per sample, the lowest drop z-scored within each teacher over the store (removes an architecture's offset)"

    def within(self, drop, sorted_drops):
        return (drop - sorted_drops.mean()) / sorted_drops.std().clamp_min(1e-6)


@POLICIES.add
class DropRank(PerTeacherDrop):
    name = "drop-rank"
    help = "per sample, the lowest drop as a mid-rank quantile within each teacher over the store"

    def within(self, drop, sorted_drops):
        below = torch.searchsorted(sorted_drops, drop, right=False)
        upto = torch.searchsorted(sorted_drops, drop, right=True)
        return (below + upto).float() / (2 * len(sorted_drops))


@POLICIES.add
class Agreement(Lowest):
    name = "agreement"
    help = "per sample, the teacher whose Grad-CAM map agrees most with the other teachers' (cosine to their mean)"
    tie = 1e-4  # cosines this close are equal (with two teachers, always: each is the other's mean)

    def score(self, evidence):
        maps = evidence.maps()
        grid = (min(m.shape[-2] for m in maps), min(m.shape[-1] for m in maps))  # the coarsest: nothing is invented
        unit = F.normalize(torch.stack([resize_maps(m, grid) for m in maps], 1).flatten(2), dim=2)
        others = (unit.sum(1, keepdim=True) - unit) / max(len(maps) - 1, 1)
        return -F.cosine_similarity(unit, others, dim=2)


def draws(num_samples: int, teachers: int, seed: int) -> torch.Tensor:
    """The drawn policies' teacher of every store row: uniform, fixed by the seed alone."""
    return torch.from_numpy(np.random.default_rng([seed, 0x5E1EC7]).integers(0, teachers, num_samples))
