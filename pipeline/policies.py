"""explain-kd's selection policies: how each sample's weight over the teachers is chosen, one class each.

A policy turns the teachers' explanation scores of a batch (Y and O, pipeline.scoring) into (B, M) weights
over the M teachers: the student's logit target is their weighted mix, and its map target the weighted
mix of their maps. `POLICIES` lists them; `--policy` takes their names.
"""

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.registry import Registry
from pipeline.scoring import best_explainer, confidence_drop, lowest_drop


class Policy:
    """What every policy answers; `one_teacher`, `mixes_maps` and `drawn` say how a run must treat it."""

    name = ""
    help = ""
    one_teacher = False  # the run learns from one teacher, chosen before training
    mixes_maps = False  # a sample's weight may spread over teachers (maps of different classes, on a predicted store)
    drawn = False  # needs the run's seeded draw of a teacher per store row (`draws`)

    def teachers(self, store, teachers: list[str]) -> list[str]:
        """The teachers the run learns from, of the store's `teachers`."""
        return teachers

    def weights(self, y: torch.Tensor, o: torch.Tensor, correct: torch.Tensor, temperature: float,
                drawn: torch.Tensor | None) -> torch.Tensor:
        """(B, M) weights from the teachers' (B, M) confidences in the explained class before (`y`) and after
        (`o`) masking with their maps, whether each classifies the sample `correct`ly, and the run's draw."""
        raise NotImplementedError


POLICIES: Registry[type[Policy]] = Registry("policy")


@POLICIES.add
class PerSample(Policy):
    name = "per-sample"
    help = "per sample, the teacher with the lowest confidence drop (ties to the larger Y)"

    def weights(self, y, o, correct, temperature, drawn):
        return F.one_hot(best_explainer(y, o), y.shape[1]).float()


@POLICIES.add
class Global(Policy):
    name = "global"
    help = "the one teacher with the lowest mean drop over the store"
    one_teacher = True

    def teachers(self, store, teachers):
        from pipeline.store.info import teacher_table  # reads the whole store once

        drops = teacher_table(store).set_index("teacher")["mean_drop"]
        print(f"explain-kd global: learning from {drops.idxmin()} (mean confidence drop {drops.min():.4f})")
        return [drops.idxmin()]

    def weights(self, y, o, correct, temperature, drawn):
        return torch.ones_like(y)


@POLICIES.add
class Weighted(Policy):
    name = "weighted"
    help = "weights proportional to Y * exp(-drop / t), t = --policy-temperature"
    mixes_maps = True

    def weights(self, y, o, correct, temperature, drawn):
        return torch.softmax(y.clamp_min(1e-12).log() - confidence_drop(y, o) / temperature, dim=1)


@POLICIES.add
class Correct(Policy):
    name = "correct"
    help = "per sample, the lowest drop among the teachers that classify it correctly (all, where none does)"

    def weights(self, y, o, correct, temperature, drawn):
        allowed = correct | ~correct.any(dim=1, keepdim=True)
        drop = torch.where(allowed, confidence_drop(y, o), torch.full_like(y, float("inf")))
        return F.one_hot(lowest_drop(drop, y), y.shape[1]).float()


@POLICIES.add
class Random(Policy):
    name = "random"
    help = "per sample a seeded, uniformly random teacher: the control for the explanation score"
    drawn = True

    def weights(self, y, o, correct, temperature, drawn):
        return F.one_hot(drawn.long(), y.shape[1]).float()


def draws(num_samples: int, teachers: int, seed: int) -> torch.Tensor:
    """The `random` policy's teacher of every store row: uniform, fixed by the seed alone."""
    return torch.from_numpy(np.random.default_rng([seed, 0x5E1EC7]).integers(0, teachers, num_samples))

