"""The student's loss: what every method (pipeline.methods) builds its terms from.

Student loss = CE(s, y) + alpha * KD + beta * MAP, where KD is Hinton's
T^2 * KL(softmax(t/T) || softmax(s/T)) on a weighted mix of the teachers' logits and MAP compares
a student map (its own differentiable Grad-CAM, or its attention map) with the same mix of the
teachers' cached maps, both resized to one grid (the student's map size by default) and
normalised per sample.
"""

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.augment import Augmentation, Moves, apply, model_input
from pipeline.explain import CamLayer, LayerTap
from pipeline.maps import normalize_maps, resize_maps
from pipeline.objective import Term
from pipeline.evidence import Evidence
from pipeline.policies import Policy
from pipeline.store.codec import dequantize_cam, full_logits
from pipeline.store.layout import teacher_array

if TYPE_CHECKING:
    from pipeline.methods import Method


def kd_per_row(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B,) T^2 * KL(teacher || student) at temperature T, per sample."""
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    return F.kl_div(log_student, teacher_probs, reduction="none").sum(1) * temperature**2


def map_term(student_cam: torch.Tensor, teacher_cam: torch.Tensor, norm: str = "l2", weight: float = 1.0) -> Term:
    """The squared distances between normalised (B, h, w) maps of one resolution, summed over the samples
    whose teacher map counts, and their count.

    l2: ||s/|s| - t/|t|||^2 (attention transfer's form, in [0, 4]); mean: the mean over cells
    of (s/mean(s) - t/mean(t))^2, which weighs a map's spread rather than its peak. Samples
    whose teacher map is empty (no positive evidence) carry no map target and are left out.
    """
    student, teacher = student_cam.flatten(1), teacher_cam.flatten(1)
    has_target = teacher.amax(dim=1) > 0
    diff = (normalize_maps(student, norm) - normalize_maps(teacher, norm)).pow(2)
    distance = torch.where(has_target, diff.sum(1) if norm == "l2" else diff.mean(1), torch.zeros_like(diff[:, 0]))
    return Term(distance.sum(), has_target.sum().to(distance.dtype), weight)


@dataclass(frozen=True)
class LossSettings:
    """The student loss's settings (TrainStudentConfig's fields of the same names; `of` takes them from one).

    Maps are compared on a `map_size` x `map_size` grid (0: the student's map size) after `map_norm`
    (config.MAP_NORMS); `beta` ramps up over `beta_warmup` epochs; with `map_follows`, cached teacher maps
    move with their images under augmentation; `student_map` is what explain-kd compares them with.
    """

    temperature: float = 4.0
    alpha: float = 1.0
    beta: float = 0.0
    beta_warmup: int = 0
    detach_head: bool = False
    student_map: str = "gradcam"
    map_follows: bool = True
    map_norm: str = "l2"
    map_size: int = 0

    @classmethod
    def of(cls, config) -> "LossSettings":
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


class DistillationLoss:
    """loss_fn for train.fit: maps a batch of store rows to the loss terms of `method` (pipeline.methods), and
    for explain-kd the share of rows each teacher was chosen for (logged only).

    `teachers` are the store's teacher names the method draws on (for `kd` and `at`, the one teacher). With
    `augmentation`, images are moved at random (and, with `map_follows`, the cached maps with them: logits do not
    depend on position). `target` is the store's: with `predicted` the student's Grad-CAM explains the class the
    chosen teacher's map explains. `policy` (pipeline.policies, fitted to the store) chooses explain-kd's teachers.
    `kd_teacher` names the one teacher whose logits explain-kd learns from (--kd-source best). Cached maps cover
    the student's image exactly: teachers and student saw one view (pipeline.views), each at its own resolution.
    """

    def __init__(self, method: "Method", teachers: list[str], student_layer: CamLayer | None, mean, std,
                 num_classes: int, settings: LossSettings = LossSettings(), *, augmentation: Augmentation | None = None,
                 kd_teacher: str | None = None, target: str = "label", policy: Policy | None = None):
        self.method, self.teachers, self.layer = method, teachers, student_layer
        self.mean, self.std, self.num_classes, self.settings = mean, std, num_classes, settings
        self.augmentation, self.kd_teacher, self.target, self.policy = augmentation, kd_teacher, target, policy
        self.epoch = 0
        self.captured, self.full_batch = None, 0  # see `capture`
        self.tap = LayerTap(student_layer.target_layer) if student_layer is not None else None  # attention maps
        if method.follows_policy != (policy is not None):
            raise ValueError(f"{method.name} {'needs' if method.follows_policy else 'takes no'} selection policy")
        one = method.one_teacher or (policy is not None and policy.one_teacher)
        if one and len(teachers) != 1:
            raise ValueError(f"{method.name} learns from one teacher, not {len(teachers)} ({', '.join(teachers)})")
        if kd_teacher is not None and not method.follows_policy:
            raise ValueError(f"{method.name} takes no separate kd_teacher: its teachers' logits are its KD target")

    def __call__(self, model: nn.Module, batch: dict) -> dict[str, Term]:
        """The batch's terms: its moves drawn and the layer tap attached here, the rest by `terms`, which
        `capture` may have captured."""
        moves = self.augmentation.draw(len(batch["labels"])) if self.augmentation else None
        if self.tap is not None:
            self.tap.attach(model)
        if self.captured is None or len(batch["labels"]) != self.full_batch:
            terms = self.terms(model, batch, moves)
        else:
            torch.compiler.cudagraph_mark_step_begin()  # a new step: the last one's graph outputs may be reused
            terms = self.captured(model, batch, moves)
        if self.tap is not None:
            self.tap.output = None  # a forward that did not read it (the Grad-CAM path's) keeps no graph alive
        return terms

    def capture(self, device: torch.device, batch_size: int) -> None:
        """Run the terms of every full batch as one captured graph (torch.compile, fullgraph): on a GPU with CUDA
        graphs (mode reduce-overhead), so the CPU no longer dispatches each operator; on the CPU with the eager
        backend, which runs the very operators of an uncaptured step (the same numbers: what tests check). A
        partial batch (a window's last) runs uncaptured: padding it to the full size would move BatchNorm's
        batch statistics, and a second shape would capture a second graph."""
        options = {"mode": "reduce-overhead"} if device.type == "cuda" else {"backend": "eager"}
        self.captured = torch.compile(self.terms, fullgraph=True, dynamic=False, **options)
        self.full_batch = batch_size

    def terms(self, model: nn.Module, batch: dict, moves: Moves | None) -> dict[str, Term]:
        return self.method.terms(Step(self, model, batch, moves))

    def beta_now(self) -> float:
        """beta, ramped linearly over the first `beta_warmup` epochs."""
        beta, warmup = self.settings.beta, self.settings.beta_warmup
        return beta * min(1.0, (self.epoch + 1) / warmup) if warmup else beta

    def teacher_maps(self, maps: list[torch.Tensor], image_size, map_size, moves: Moves | None) -> torch.Tensor:
        """Cached (B, h, w) maps, one per teacher -> (B, M, *map_size): moved like their images, resized,
        each normalised (so that mixing teachers weighs their maps alike). Teachers whose maps share a
        size are computed on together (a step's fixed cost is per op)."""
        sizes = {}
        for m, cam in enumerate(maps):
            sizes.setdefault(tuple(cam.shape[-2:]), []).append(m)
        out = [None] * len(maps)
        for members in sizes.values():
            group = torch.stack([maps[m] for m in members], 1)  # (B, teachers of this size, h, w)
            if moves is not None and self.settings.map_follows:
                group = apply(resize_maps(group, tuple(image_size)), moves)  # a sample's maps move as its channels
            group = resize_maps(group, tuple(map_size))
            group = normalize_maps(group.flatten(2), self.settings.map_norm).view(group.shape)
            for i, m in enumerate(members):
                out[m] = group[:, i]
        return torch.stack(out, 1)


class Step:
    """One batch of one method's loss: the student's input, the teachers' cached values, and the pieces of
    loss every method shares. Every teacher's values are stacked (B, M, ...) and computed on at once (a step's
    fixed cost is per op)."""

    def __init__(self, loss: DistillationLoss, model: nn.Module, batch: dict, moves: Moves | None):
        self.loss, self.model, self.batch, self.moves = loss, model, batch, moves
        self.settings, self.teachers, self.layer = loss.settings, loss.teachers, loss.layer
        self.kd_teacher, self._teacher_logits = loss.kd_teacher, None
        self.x, self.labels = model_input(batch, moves, loss.mean, loss.std)

    def field(self, key: str) -> torch.Tensor:
        """(B, M) or (B, M, ...): each teacher's array `key`."""
        return torch.stack([self.batch[teacher_array(t, key)] for t in self.teachers], 1)

    @property
    def teacher_logits(self) -> torch.Tensor:
        """(B, M, C) float32, from either logits mode; made once per step (a plain attribute, not
        functools.cached_property, whose lock torch.compile cannot trace on Python 3.11)."""
        if self._teacher_logits is None:
            self._teacher_logits = torch.stack([full_logits(self.batch, t, self.loss.num_classes)
                                                for t in self.teachers], 1)
        return self._teacher_logits

    def uniform(self) -> torch.Tensor:
        """(B, M) equal weights: one teacher, or the mean of all."""
        return torch.full((len(self.labels), len(self.teachers)), 1.0 / len(self.teachers), device=self.x.device)

    def only(self, teacher: str) -> torch.Tensor:
        """(B, M) all weight on `teacher`."""
        return F.one_hot(torch.full(self.labels.shape, self.teachers.index(teacher), device=self.x.device),
                         len(self.teachers)).float()

    def evidence(self) -> Evidence:
        """What the selection policy weighs, for this batch's rows."""
        return Evidence.of(self.batch, self.teachers, self.labels, self.batch["index"], self.loss.num_classes,
                           self.teacher_logits)

    def forward(self, need_activation: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(float32 logits, the CAM layer's activation when an attention map needs it). Losses are taken in
        float32: under bf16 autocast the KL of bf16 logits is 4 % off."""
        logits = self.model(self.x).float()
        activation = self.loss.tap.take() if self.loss.tap is not None else None
        return logits, activation if need_activation else None

    def ce(self, logits: torch.Tensor) -> Term:
        return Term.over(F.cross_entropy(logits, self.labels, reduction="none"))

    def kd(self, logits: torch.Tensor, weights: torch.Tensor) -> Term:
        """KD towards the (B, M) `weights`' mix of the teachers' softened outputs, weighted alpha."""
        soft = F.softmax(self.teacher_logits / self.settings.temperature, dim=2)  # (B, M, C)
        target = (weights[..., None] * soft).sum(1)
        return Term.over(kd_per_row(logits, target, self.settings.temperature), self.settings.alpha)

    def kd_each(self, logits: torch.Tensor, weights: torch.Tensor) -> Term:
        """The (B, M) `weights`' mix of the KD terms towards each teacher's softened outputs (not KD towards the mix
        of their outputs, as `kd`), weighted alpha: the multi-teacher losses of AVER, CA-MKD and EBKD."""
        temperature = self.settings.temperature
        soft = F.softmax(self.teacher_logits / temperature, dim=2)  # (B, M, C)
        each = torch.stack([kd_per_row(logits, soft[:, m], temperature) for m in range(soft.shape[1])], 1)
        return Term.over((weights * each).sum(1), self.settings.alpha)

    def map_term(self, student_map: torch.Tensor, weights: torch.Tensor, key: str, beta: float) -> Term:
        """The student map against the (B, M) `weights`' mix of the teachers' cached maps `key` ("cam" or
        "attention"), each moved like its image, resized and normalised; weighted `beta`."""
        settings = self.settings
        size = (settings.map_size, settings.map_size) if settings.map_size else tuple(student_map.shape[-2:])
        maps = self.loss.teacher_maps([dequantize_cam(self.batch[teacher_array(t, key)],
                                                      self.batch[teacher_array(t, f"{key}_max")])
                                       for t in self.teachers], self.x.shape[-2:], size, self.moves)
        return map_term(resize_maps(student_map.float(), size), (weights[..., None, None] * maps).sum(1),
                        settings.map_norm, beta)

    def explained_class(self, weights: torch.Tensor) -> torch.Tensor:
        """The class the student's Grad-CAM explains: the label, or on a `predicted` store the class
        the map of the most-weighted teacher explains (the store's `cam_class`)."""
        if self.loss.target == "label":
            return self.labels
        return self.field("cam_class").long().gather(1, weights.argmax(1, keepdim=True))[:, 0]
