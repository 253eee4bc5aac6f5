"""Distillation losses and per-sample teacher selection.

Student loss = CE(s, y) + alpha * KD + beta * MAP, where KD is Hinton's
T^2 * KL(softmax(t/T) || softmax(s/T)) on the selected teacher's logits and MAP compares
the student's own (differentiable) Grad-CAM with the selected teacher's cached map,
both at the student's map resolution and L2-normalised per sample.
"""

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.cache import dequantize_cam, full_logits
from pipeline.data import normalize
from pipeline.explain import CamLayer, grad_cam


def kd_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher || student) at temperature T, averaged over the batch."""
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    return F.kl_div(log_student, teacher_probs, reduction="batchmean") * temperature**2


def resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) -> (B, *size), bilinear."""
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def map_loss(student_cam: torch.Tensor, teacher_cam: torch.Tensor) -> torch.Tensor:
    """Mean over samples of ||s/|s| - t/|t|||^2 on flattened (B, h, w) maps of one resolution.

    Samples whose teacher map is empty (no positive evidence) carry no map target and
    are left out; a student map that is all zero counts as the zero vector.
    """
    student, teacher = student_cam.flatten(1), teacher_cam.flatten(1)
    has_target = teacher.norm(dim=1) > 0
    if not has_target.any():
        return student.sum() * 0.0
    diff = F.normalize(student, dim=1) - F.normalize(teacher, dim=1)
    return diff[has_target].pow(2).sum(1).mean()


def confidence_change(y_prob: torch.Tensor, o_prob: torch.Tensor) -> torch.Tensor:
    """(Y - O) / Y: the confidence drop before clamping at 0, so that among teachers with no
    drop the one whose explanation raises confidence most ranks first."""
    return (y_prob - o_prob) / y_prob.clamp_min(1e-12)


def best_explainer(y_prob: torch.Tensor, o_prob: torch.Tensor) -> torch.Tensor:
    """(B, M) confidences of M teachers -> (B,) index of the best-explaining teacher."""
    return confidence_change(y_prob, o_prob).argmin(dim=1)


def teacher_fields(method: str, teachers: list[str], logit_fields: tuple[str, ...] = ("logits",)) -> list[str]:
    """Store arrays a method reads, besides images and labels (`logit_fields`: the store's logits mode)."""
    per_teacher = {"ce": (), "kd": logit_fields, "kd-avg": logit_fields,
                   "explain-kd": (*logit_fields, "cam", "cam_max", "y_prob", "o_prob")}[method]
    return [f"teachers/{name}/{field}" for name in teachers for field in per_teacher]


class DistillationLoss:
    """loss_fn for train.fit: maps a batch of store rows to a dict of loss components.

    `teachers` are the store's teacher names the method draws on (for `kd`, the one teacher).
    """

    def __init__(self, method: str, teachers: list[str], student_layer: CamLayer, mean, std,
                 temperature: float, alpha: float, beta: float, num_classes: int):
        self.method, self.teachers, self.layer = method, teachers, student_layer
        self.num_classes = num_classes
        self.mean, self.std = mean, std
        self.temperature, self.alpha, self.beta = temperature, alpha, beta

    def __call__(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        x, labels = normalize(batch["images"], self.mean, self.std), batch["labels"].long()
        use_map = self.method == "explain-kd" and self.beta > 0
        if use_map:
            logits, student_cam = grad_cam(model, x, labels, self.layer, create_graph=True)
        else:
            logits = model(x)
        losses = {"ce": F.cross_entropy(logits, labels)}
        total = losses["ce"]
        if self.method != "ce":
            field = lambda name, key: batch[f"teachers/{name}/{key}"]  # noqa: E731
            soft = torch.stack([F.softmax(full_logits(batch, t, self.num_classes) / self.temperature, dim=1)
                                for t in self.teachers], dim=1)  # (B, M, C)
            if self.method == "kd-avg":
                probs = soft.mean(1)
            elif self.method == "kd":
                probs = soft[:, 0]
            else:
                choice = best_explainer(torch.stack([field(t, "y_prob") for t in self.teachers], 1),
                                        torch.stack([field(t, "o_prob") for t in self.teachers], 1))
                probs = soft[torch.arange(len(choice)), choice]
                for m, name in enumerate(self.teachers):
                    losses[f"chosen/{name}"] = (choice == m).float().mean()
            losses["kd"] = kd_loss(logits, probs, self.temperature)
            total = total + self.alpha * losses["kd"]
            if use_map:
                maps = torch.stack([resize_maps(dequantize_cam(field(t, "cam"), field(t, "cam_max")),
                                                student_cam.shape[-2:]) for t in self.teachers], dim=1)
                losses["map"] = map_loss(student_cam, maps[torch.arange(len(choice)), choice])
                total = total + self.beta * losses["map"]
        losses["loss"] = total
        return losses
