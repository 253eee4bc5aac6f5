"""Distillation losses and per-sample teacher selection.

Student loss = CE(s, y) + alpha * KD + beta * MAP, where KD is Hinton's
T^2 * KL(softmax(t/T) || softmax(s/T)) on the selected teacher's logits and MAP compares
the student's own (differentiable) Grad-CAM with the selected teacher's cached map, both
resized to one grid (the student's map size by default) and normalised per sample.
"""

import functools

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.augment import Augmentation, Moves, apply, model_input
from pipeline.explain import CamLayer, attention_map, captured, grad_cam
from pipeline.objective import Term
from pipeline.scoring import selection_weights
from pipeline.store.codec import dequantize_cam, full_logits
from pipeline.store.layout import teacher_array, teacher_arrays


def kd_per_row(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B,) T^2 * KL(teacher || student) at temperature T, per sample."""
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    return F.kl_div(log_student, teacher_probs, reduction="none").sum(1) * temperature**2


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
    edges = torch.arange(outputs + 1, dtype=torch.float64) * inputs / outputs
    cells = torch.arange(inputs, dtype=torch.float64)
    overlap = torch.minimum(edges[1:, None], cells + 1) - torch.maximum(edges[:-1, None], cells)
    return (overlap.clamp_min(0) * outputs / inputs).float().to(device)


def normalize_maps(maps: torch.Tensor, norm: str) -> torch.Tensor:
    """Flattened (..., h*w) maps scaled each: to unit L2 norm (l2) or to mean 1 (mean); zero maps stay zero."""
    if norm == "l2":
        return F.normalize(maps, dim=-1)
    return maps / maps.mean(dim=-1, keepdim=True).clamp_min(1e-12)


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


def teacher_fields(method: str, teachers: list[str], logit_fields: tuple[str, ...] = ("logits",)) -> list[str]:
    """Store arrays a method reads, besides images and labels (`logit_fields`: the store's logits mode)."""
    per_teacher = {"ce": (), "kd": logit_fields, "kd-avg": logit_fields,
                   "at": (*logit_fields, "attention", "attention_max"),
                   "explain-kd": (*logit_fields, "cam", "cam_max", "cam_class", "y_prob", "o_prob")}[method]
    return teacher_arrays(teachers, per_teacher)


class DistillationLoss:
    """loss_fn for train.fit: maps a batch of store rows to its loss terms (pipeline.objective): ce, kd and
    map, and the share of rows each teacher was chosen for (logged only).

    `teachers` are the store's teacher names the method draws on (for `kd` and `at`, the one
    teacher). With `augmentation`, images are moved at random; with `map_follows` the cached
    teacher maps move with them (logits do not depend on position). Maps are compared on a
    `map_size` x `map_size` grid (0: the student's map size) after `map_norm` (config.MAP_NORMS).
    `target` is the store's: with `predicted` the student's Grad-CAM explains the class the
    chosen teacher's map explains. `random_choice` (N,) holds the teacher of every store row for
    the `random` policy. Cached maps cover the student's image exactly: teachers and student saw
    one view (pipeline.views), each at its own resolution.
    """

    def __init__(self, method: str, teachers: list[str], student_layer: CamLayer | None, mean, std,
                 temperature: float, alpha: float, beta: float, num_classes: int, *,
                 policy: str = "per-sample", policy_temperature: float = 0.1, detach_head: bool = False,
                 beta_warmup: int = 0, augmentation: Augmentation | None = None, map_follows: bool = True,
                 student_map: str = "gradcam", kd_teacher: str | None = None, map_norm: str = "l2",
                 map_size: int = 0, target: str = "label", random_choice: torch.Tensor | None = None):
        self.method, self.teachers, self.layer = method, teachers, student_layer
        self.num_classes = num_classes
        self.mean, self.std = mean, std
        self.temperature, self.alpha, self.beta = temperature, alpha, beta
        self.policy, self.policy_temperature, self.detach_head = policy, policy_temperature, detach_head
        self.beta_warmup, self.augmentation, self.map_follows = beta_warmup, augmentation, map_follows
        self.student_map, self.kd_teacher = student_map, kd_teacher
        self.map_norm, self.map_size = map_norm, map_size
        self.target, self.random_choice = target, random_choice
        self.epoch = 0

    def beta_now(self) -> float:
        """beta, ramped linearly over the first `beta_warmup` epochs."""
        return self.beta * min(1.0, (self.epoch + 1) / self.beta_warmup) if self.beta_warmup else self.beta

    def __call__(self, model: nn.Module, batch: dict) -> dict[str, Term]:
        x, labels, moves = model_input(batch, self.augmentation, self.mean, self.std)
        if self.method == "ce":
            return {"ce": Term.over(F.cross_entropy(model(x).float(), labels, reduction="none"))}
        field = lambda key: torch.stack([batch[teacher_array(t, key)] for t in self.teachers], 1)  # noqa: E731
        # every teacher's values are stacked (B, M, ...) and computed on at once: a step's fixed cost per op
        teacher_logits = torch.stack([full_logits(batch, t, self.num_classes) for t in self.teachers], 1)
        soft = F.softmax(teacher_logits / self.temperature, dim=2)  # (B, M, C)
        losses = {}
        if self.method == "explain-kd":
            choice = None if self.random_choice is None else self.random_choice[batch["index"].cpu()].to(x.device)
            weights = selection_weights(self.policy, field("y_prob"), field("o_prob"),
                                        teacher_logits.argmax(2) == labels[:, None], self.policy_temperature, choice)
            for m, name in enumerate(self.teachers):
                losses[f"chosen/{name}"] = Term.over(weights[:, m], weight=0.0)
        else:  # kd and at: the one teacher; kd-avg: all alike
            weights = torch.full(soft.shape[:2], 1.0 / soft.shape[1], device=soft.device)
        beta = self.beta_now()
        use_cam = self.method == "explain-kd" and beta > 0
        if use_cam and self.student_map == "gradcam":
            logits, student_map, _ = grad_cam(model, x, self.explained_class(batch, labels, weights), self.layer,
                                              create_graph=True, detach_head=self.detach_head)
        else:
            logits, activation = self.forward(model, x, need_activation=use_cam or self.method == "at")
            student_map = attention_map(activation) if activation is not None else None
        logits = logits.float()  # losses in float32 (under bf16 autocast the KL of bf16 logits is 4 % off)
        student_map = student_map.float() if student_map is not None else None
        losses["ce"] = Term.over(F.cross_entropy(logits, labels, reduction="none"))
        kd_weights = weights if self.kd_teacher is None else F.one_hot(
            torch.full(weights.shape[:1], self.teachers.index(self.kd_teacher), device=weights.device),
            len(self.teachers)).float()  # logits from one teacher, maps chosen per sample
        losses["kd"] = Term.over(kd_per_row(logits, (kd_weights[..., None] * soft).sum(1), self.temperature),
                                 self.alpha)
        if use_cam or self.method == "at":
            key = "cam" if use_cam else "attention"
            size = (self.map_size, self.map_size) if self.map_size else tuple(student_map.shape[-2:])
            maps = self.teacher_maps([dequantize_cam(batch[teacher_array(t, key)], batch[teacher_array(t, f"{key}_max")])
                                      for t in self.teachers], x.shape[-2:], size, moves)
            losses["map"] = map_term(resize_maps(student_map, size), (weights[..., None, None] * maps).sum(1),
                                     self.map_norm, beta)
        return losses

    def explained_class(self, batch: dict, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The class the student's Grad-CAM explains: the label, or on a `predicted` store the class
        the map of the most-weighted teacher explains (the store's `cam_class`)."""
        if self.target == "label":
            return labels
        classes = torch.stack([batch[teacher_array(t, "cam_class")] for t in self.teachers], 1).long()
        return classes.gather(1, weights.argmax(1, keepdim=True))[:, 0]

    def forward(self, model: nn.Module, x: torch.Tensor, need_activation: bool) -> tuple:
        """(logits, the CAM layer's activation when an attention map needs it)."""
        if not need_activation:
            return model(x), None
        with captured(model, self.layer.target_layer) as box:
            logits = model(x)
        return logits, box["activation"]

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
            if moves is not None and self.map_follows:
                group = apply(resize_maps(group, tuple(image_size)), moves)  # a sample's maps move as its channels
            group = resize_maps(group, tuple(map_size))
            group = normalize_maps(group.flatten(2), self.map_norm).view(group.shape)
            for i, m in enumerate(members):
                out[m] = group[:, i]
        return torch.stack(out, 1)
