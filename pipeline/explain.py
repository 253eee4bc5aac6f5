"""Batched Grad-CAM (closed form and autograd) and the Grad-CAM++ confidence-drop score.

Grad-CAM for class c at a layer with activations A (K x h x w) is
L = ReLU(sum_k a_k A_k) with a_k = mean_ij dY_c/dA_kij. When the head is
global-average-pool + Linear, a_k = W[c, k] / (h w) exactly, so the map needs one
forward pass and no backward (Grad-CAM paper, section 3.1). Any other head takes
the autograd path. Both paths return the same map where both apply (tested).
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import PipelineError


POOLING = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
           nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)


@dataclass(frozen=True)
class CamLayer:
    """Where a model's Grad-CAM is taken: a module path, and the GAP head's Linear if any."""

    target_layer: str
    linear_head: str | None = None

    @classmethod
    def of(cls, model: nn.Module, probe: torch.Tensor, target_layer: str | None = None) -> "CamLayer":
        """`target_layer`, else the model's declared `cam_layer`, else the last feature map
        before pooling; the closed form is used when the head is shown to be GAP + Linear on `probe`."""
        layer = target_layer or getattr(model, "cam_layer", None) or find_target_layer(model, probe)
        check_not_modified_in_place(model, layer, probe)
        return cls(layer, gap_linear_head(model, layer, probe))

    @property
    def path(self) -> str:
        return "closed-form" if self.linear_head else "autograd"


def probe_input(image_shape: tuple[int, int, int], batch: int = 2) -> torch.Tensor:
    """A fixed random (batch, C, H, W) input for shape and head probes."""
    height, width, channels = image_shape
    return torch.randn(batch, channels, height, width, generator=torch.Generator().manual_seed(0))


def find_target_layer(model: nn.Module, probe: torch.Tensor) -> str:
    """The last module output that is a 4-D feature map (larger than 1x1, channels first: its last two
    sides in the input's proportions) not made by pooling; refused when token sequences follow it.

    Of the modules that return that same tensor (a block and its last layer), the outermost
    is named: `layer4` for a ResNet, `features.19` (the last ReLU) for VGG-11.
    """
    finished: list[tuple[str, nn.Module, object]] = []
    handles = [module.register_forward_hook(lambda m, i, out, path=path: finished.append((path, m, out)))
               for path, module in model.named_modules() if path]
    try:
        with torch.no_grad():
            model(probe)
    finally:
        for handle in handles:
            handle.remove()
    height, width = probe.shape[-2:]
    maps = [out for path, module, out in finished
            if not list(module.children()) and not isinstance(module, POOLING)
            and isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[-2:].numel() > 1
            and abs(out.shape[-2] * width / height - out.shape[-1]) <= 1]  # laid out as the image, within a cell
    if not maps:
        raise PipelineError(f"{type(model).__name__} has no module producing a 4-D feature map; "
                            "name one with --target-layer <teacher>=<module.path>")
    owners = [(path.count("."), -i, path) for i, (path, _, out) in enumerate(finished) if out is maps[-1]]
    layer = min(owners)[2]
    after = max(i for i, (_, _, out) in enumerate(finished) if out is maps[-1])
    if any(isinstance(out, torch.Tensor) and out.dim() == 3 and out.shape[1] > 1 for _, _, out in finished[after + 1:]):
        raise PipelineError(f"{type(model).__name__} turns its last feature map ({layer}) into a sequence of tokens "
                            "(a vision transformer, or an attention-pooling head): its Grad-CAM would explain that "
                            "layer, not what the head reads; choose a CNN teacher, or name a 4-D layer with "
                            "--target-layer <teacher>=<module.path>")
    return layer


def gap_linear_head(model: nn.Module, layer: str, probe: torch.Tensor) -> str | None:
    """The Linear that maps the global average of `layer`'s output to the logits, if one does.

    Checked numerically on `probe` (eval mode), so norm or extra layers between the map and the
    Linear (VGG, MobileNetV3) send the model to the autograd path; DenseNet's in-place ReLU
    rectifies the recorded map itself (see `captured`), so DenseNet takes the closed form.
    """
    with torch.no_grad(), captured(model, layer) as box:
        logits = model(probe)
    activation = box["activation"]
    if activation.dim() != 4:
        return None
    pooled = activation.float().mean(dim=(2, 3))
    for path, module in reversed(list(model.named_modules())):
        if isinstance(module, nn.Linear) and (module.in_features, module.out_features) == (
                pooled.shape[1], logits.shape[1]):
            predicted = F.linear(pooled, module.weight.float(), None if module.bias is None else module.bias.float())
            if torch.allclose(predicted, logits.float(), rtol=1e-3, atol=1e-4 * (1 + float(logits.abs().max()))):
                return path
    return None


def check_not_modified_in_place(model: nn.Module, layer: str, probe: torch.Tensor) -> None:
    """Refuse a layer whose output a later in-place operation changes into something other than its
    ReLU: the map would be of another tensor than the layer names (a residual sum, say)."""
    box: dict = {}

    def hook(_module, _inputs, output):
        box["output"], box["before"] = output, output.clone()

    handle = module_path(model, layer).register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(probe)
    finally:
        handle.remove()
    after, before = box["output"], box["before"]
    if not (torch.equal(after, before) or torch.equal(after, torch.relu(before))):
        raise PipelineError(f"the output of {type(model).__name__}.{layer} is changed in place later in the network "
                            "(not by a ReLU, e.g. a residual addition), so its map would be of another tensor; "
                            "name the module that produces the changed tensor (the enclosing block) with "
                            "--target-layer")


def module_path(model: nn.Module, path: str) -> nn.Module:
    """The module at `path` of `model` (of the model inside a DistributedDataParallel wrapper)."""
    model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    modules = dict(model.named_modules())
    if path not in modules:
        names = [name for name in modules if name]
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        raise PipelineError(f"{type(model).__name__} has no module {path!r}; modules are: {shown}")
    return modules[path]


class LayerTap:
    """The output of one layer in the last forward pass, recorded by a hook that stays on the model: registered
    once, outside the step (a step captured by torch.compile cannot register hooks), and read after each
    forward pass."""

    def __init__(self, layer: str):
        self.layer, self.model, self.handle, self.output = layer, None, None, None

    def attach(self, model: nn.Module) -> None:
        if self.model is not model:
            if self.handle is not None:
                self.handle.remove()
            self.handle = module_path(model, self.layer).register_forward_hook(self.record)
            self.model = model

    def record(self, _module, _inputs, output) -> None:
        self.output = output

    def take(self) -> torch.Tensor:
        """The output recorded, forgotten here (so no step's graph outlives the step)."""
        output, self.output = self.output, None
        return output


@contextmanager
def captured(model: nn.Module, layer: str, detach: bool = False) -> Iterator[dict]:
    """Record the output of `layer` during forward passes inside the block.

    The record is the tensor the rest of the network goes on with: an in-place operation after
    the layer (DenseNet's ReLU before its pooling head) changes it, so the map is taken of the
    rectified features the classifier pools, and gradients are taken with respect to them.
    With `detach`, the recorded output feeds the layers after it from a new leaf, so a
    backward pass only runs through those layers.
    """
    box: dict = {}

    def hook(_module, _inputs, output):
        if detach:  # a copy of a leaf, so that in-place operations after the layer are allowed
            output = output.detach().requires_grad_(True).clone()
        box["activation"] = output
        return output

    handle = module_path(model, layer).register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


def grad_cam(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor | None, layer: CamLayer, create_graph: bool = False,
    detach_head: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (logits (B, C), Grad-CAM maps (B, h, w), the layer's activations (B, K, h, w)) for
    class `target` (None: the argmax).

    `create_graph=True` keeps the map differentiable w.r.t. the model (a student's map in
    the loss); otherwise nothing carries a graph. `detach_head` (closed form only) treats
    the classifier weights in the map as constants, so a map loss shapes features only.
    """
    if layer.linear_head:
        no_graph = torch.inference_mode() if not create_graph else torch.enable_grad()
        with no_graph, captured(model, layer.target_layer) as box:
            logits = model(x)
            activation = box["activation"]
            target = logits.argmax(1) if target is None else target
            weight = module_path(model, layer.linear_head).weight[target]  # (B, K)
            weight = weight.detach() if detach_head else weight
            h, w = activation.shape[-2:]
            return logits, torch.relu(torch.einsum("bk,bkhw->bhw", weight, activation)) / (h * w), activation
    with torch.enable_grad(), captured(model, layer.target_layer, detach=not create_graph) as box:
        logits = model(x)
        activation = box["activation"]
        target = logits.argmax(1) if target is None else target
        score = logits.gather(1, target[:, None]).sum()
        (grads,) = torch.autograd.grad(score, activation, create_graph=create_graph)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * activation).sum(1))
    if not create_graph:
        logits, cam, activation = logits.detach(), cam.detach(), activation.detach()
    return logits, cam, activation


def attention_map(activation: torch.Tensor) -> torch.Tensor:
    """Attention transfer's spatial map (Zagoruyko & Komodakis): mean over channels of A^2."""
    return activation.float().pow(2).mean(dim=1)


def upsample_minmax(cam: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) maps -> (B, H, W), bilinear, each scaled to [0, 1]; an empty map stays 0."""
    up = F.interpolate(cam[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    low = up.amin(dim=(1, 2), keepdim=True)
    span = up.amax(dim=(1, 2), keepdim=True) - low
    return torch.where(span > 0, (up - low) / span.clamp_min(torch.finfo(up.dtype).tiny), torch.zeros_like(up))


@torch.inference_mode()
def explanation_confidences(
    model: nn.Module, x: torch.Tensor, logits: torch.Tensor, cam: torch.Tensor, target: torch.Tensor,
    mean: tuple[float, ...], std: tuple[float, ...],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Y = p(target | x) and O = p(target | E), E = up(L) * I, the explanation image of Grad-CAM++.

    `x` is the normalised input (x - mean) / std; the mask multiplies the image I itself
    (in [0, 1]), so an explained-away pixel turns black as in the paper, not mean-grey.
    """
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    mask = upsample_minmax(cam, x.shape[-2:])[:, None].to(x.dtype)
    explanation = (mask * (x * std + mean) - mean) / std
    y = torch.softmax(logits.float(), 1).gather(1, target[:, None])[:, 0]
    o = torch.softmax(model(explanation).float(), 1).gather(1, target[:, None])[:, 0]
    return y, o


@dataclass
class Explanation:
    """Everything stage one caches for a batch: logits, map, the explained class, Y and O, and
    the attention map of the same layer (for the attention-transfer baseline)."""

    logits: torch.Tensor
    cam: torch.Tensor
    target: torch.Tensor
    y_prob: torch.Tensor
    o_prob: torch.Tensor
    attention: torch.Tensor


def explain(model: nn.Module, layer: CamLayer, x: torch.Tensor, labels: torch.Tensor, target: str,
            mean: tuple[float, ...], std: tuple[float, ...]) -> Explanation:
    """Grad-CAM of the ground-truth class (`target="label"`) or the predicted one, and its score.

    `x` is the input normalised with `mean` and `std` (needed to mask the image itself).
    """
    logits, cam, activation = grad_cam(model, x, labels if target == "label" else None, layer)
    explained = labels if target == "label" else logits.argmax(1)
    y, o = explanation_confidences(model, x, logits, cam, explained, mean, std)
    return Explanation(logits, cam, explained, y, o, attention_map(activation))
