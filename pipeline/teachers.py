"""Teacher specs -> models ready for extraction, with their transform and Grad-CAM layer.

    checkpoint:<path> (or a bare path)   a checkpoint of a registered architecture
    torchvision:<arch>:<weights>         torchvision pretrained weights, e.g. resnet50:IMAGENET1K_V2
    torchvision:<arch>:<file>            a state_dict file of that architecture, trained anywhere
    timm:<name>                          timm pretrained weights (needs the optional timm package)
    timm:<name>:<file>                   a state_dict file of that timm model

Pretrained weights are read from the torch hub cache (TORCH_HOME), downloaded there only
when missing; a teacher carries the eval transform its weights were trained with. A
state_dict file or a checkpoint without a transform is fed as the data set's own eval
transform feeds images (its mean, std and resize/crop).
"""

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from pipeline.data import DatasetInfo, Geometry, normalize
from pipeline.devices import autocast, to_device
from pipeline.errors import PipelineError
from pipeline.explain import CamLayer, Explanation, captured, explain, probe_input
from pipeline.models.checkpoint import load_checkpoint, weights_sha256

SOURCES = ("checkpoint", "torchvision", "timm")


@dataclass
class Transform:
    """A teacher's eval transform: normalisation, and resize/crop for data sets of image files."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    geometry: Geometry | None = None

    def as_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std),
                **(self.geometry.as_dict() if self.geometry else {})}


class Loaded(NamedTuple):
    model: nn.Module
    name: str
    arch: str  # a model registry name, or timm:<name>
    transform: Transform | None  # None: the data set's eval transform
    held_out_top1: float | None  # its checkpoint's own validation figure, else None
    trained_split_seed: int | None = None  # for a teacher trained by this project on the same data set
    validated_on: dict | None = None  # the identity of the split that figure was measured on, where recorded


@dataclass
class Teacher:
    name: str
    model: nn.Module
    layer: CamLayer
    transform: Transform
    identity: dict  # what the store records about this teacher

    @property
    def geometry(self) -> Geometry | None:
        return self.transform.geometry


def teacher_outputs(teacher: Teacher, images: torch.Tensor, labels: torch.Tensor, target: str,
                    device: torch.device) -> Explanation:
    """The teacher's logits, Grad-CAM map and explanation scores for uint8 (B, H, W, C) images at its input size."""
    mean, std = teacher.transform.mean, teacher.transform.std
    x = to_device(normalize(images.to(device, non_blocking=True), mean, std), device)
    with autocast(device):
        return explain(teacher.model, teacher.layer, x, labels.to(device), target, mean, std)


def parse_target_layers(items: list[str]) -> dict[str, str]:
    """["resnet50=layer4", ...] -> {"resnet50": "layer4"}."""
    layers = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not (sep and name and path):
            raise PipelineError(f"--target-layer takes <teacher>=<module.path>, e.g. vgg11=features.20; got {item!r}")
        layers[name.strip()] = path.strip()
    return layers


def load_teacher(spec: str, info: DatasetInfo, target_layers: dict[str, str] | None = None,
                 split_seed: int | None = None, heldout: dict | None = None) -> Teacher:
    """Build the teacher of `spec` for data set `info` (split by `split_seed`), find its Grad-CAM
    layer and map size. `heldout` is the identity of the split it is judged on (pipeline.heldout)."""
    source, _, rest = spec.partition(":")
    if source == "torchvision":
        loaded = torchvision_teacher(rest, info.num_classes)
    elif source == "timm":
        loaded = timm_teacher(rest, info.num_classes)
    elif source == "checkpoint" or not rest or Path(spec).suffix:
        loaded = checkpoint_teacher(spec.removeprefix("checkpoint:"), info.name)
    else:
        raise PipelineError(f"unknown teacher source {source!r} in {spec!r}; choose one of: "
                            f"{', '.join(SOURCES)} (or a checkpoint path)")
    model, name = loaded.model.eval(), loaded.name
    if None not in (loaded.trained_split_seed, split_seed) and loaded.trained_split_seed != split_seed:
        raise PipelineError(f"teacher {spec} was trained on {info.name} split with --split-seed "
                            f"{loaded.trained_split_seed}, this run uses {split_seed}: its training images may be "
                            f"this run's validation or test images; use --split-seed {loaded.trained_split_seed}")
    given = loaded.transform or Transform(info.mean, info.std, info.geometry)
    # image-file data sets decode at each teacher's own resize/crop; in-memory ones have one size
    geometry = (given.geometry or info.geometry) if info.geometry else None
    transform = Transform(given.mean, given.std, geometry)
    shape = (geometry.crop, geometry.crop, info.image_shape[2]) if geometry else info.image_shape
    probe = probe_input(shape)
    layer = CamLayer.of(model, probe, (target_layers or {}).get(name))
    with torch.no_grad(), captured(model, layer.target_layer) as box:  # one pass: class count and map size
        classes = model(probe).shape[1]
    if classes != info.num_classes:
        raise PipelineError(f"teacher {spec} predicts {classes} classes but data set {info.name} has "
                            f"{info.num_classes}; pass a teacher trained on {info.name}")
    identity = {
        "arch": loaded.arch, "source": spec, "weights_sha256": weights_sha256(model),
        "target_layer": layer.target_layer, "cam_path": layer.path, "transform": transform.as_dict(),
        "map_shape": list(box["activation"].shape[-2:]),
        "heldout_data": heldout and {k: heldout[k] for k in ("name", "split", "num_samples", "ids_sha256")},
        "checkpoint_val_top1": loaded.held_out_top1,  # shown beside the figure measured on `heldout`:
        "checkpoint_val_data": None if loaded.validated_on is None else  # was it measured on the same images?
        "same" if loaded.validated_on == heldout else "other",
    }
    return Teacher(name, model, layer, transform, identity)


def checkpoint_teacher(path: str, dataset: str) -> Loaded:
    model, record = load_checkpoint(path)
    t = record.get("transform")
    geometry = Geometry(t["resize"], t["crop"], t.get("interpolation", "bilinear")) if t and "crop" in t else None
    transform = Transform(tuple(t["mean"]), tuple(t["std"]), geometry) if t else None
    # held out: validation accuracy only (`top1` is on the test split, never used to choose)
    held_out = record.get("metrics", {}).get("val_top1")
    same_data = record.get("dataset", {}).get("name") == dataset
    seed = record.get("config", {}).get("split_seed") if same_data else None
    return Loaded(model, record.get("name", record["arch"].split(":")[-1]), record["arch"], transform, held_out, seed,
                  record.get("val_dataset"))


def is_weights_file(weights: str) -> bool:
    """`torchvision:<arch>:<weights>`: a file path rather than the name of published weights."""
    return "/" in weights or Path(weights).suffix.lower() in (".pt", ".pth", ".bin", ".ckpt") or Path(weights).is_file()


def load_state_dict_file(model: nn.Module, path: str, spec: str) -> nn.Module:
    """Load a plain state_dict (also wrapped as {"state_dict": ...} or {"model": ...}, or saved
    from DataParallel with "module." prefixes) into `model`; one-line errors on any mismatch."""
    if not Path(path).is_file():
        raise PipelineError(f"weights file {path} of teacher {spec} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise PipelineError(f"weights file {path} cannot be read ({type(error).__name__}); "
                            "save the model's state_dict with torch.save") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PipelineError(f"weights file {path} holds no state_dict (a dict of tensors); "
                            "save it with torch.save(model.state_dict(), path)")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        first = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected else
                 f"{wrong[0]} is {tuple(state[wrong[0]].shape)}, expected {tuple(own[wrong[0]].shape)}")
        raise PipelineError(f"weights file {path} does not fit {spec} ({len(missing)} missing, {len(unexpected)} "
                            f"unexpected, {len(wrong)} mis-shaped keys; first: {first}); check the architecture "
                            "name and that the model predicts the data set's classes")
    model.load_state_dict(state)
    return model


def torchvision_weights(arch: str, weights_name: str):
    """The weights enum member and its eval transform, without fetching anything."""
    import torchvision

    from pipeline.models import torchvision_architectures

    if arch not in torchvision_architectures():
        raise PipelineError(f"unknown torchvision architecture {arch!r}; choose one of: "
                            f"{', '.join(torchvision_architectures())}")
    enum = torchvision.models.get_model_weights(arch)
    names = [w.name for w in enum]
    if not weights_name:
        raise PipelineError(f"torchvision:{arch} needs weights, one of: {', '.join(names)}, DEFAULT "
                            f"(e.g. torchvision:{arch}:DEFAULT); for your own weights use checkpoint:<path>")
    if weights_name != "DEFAULT" and weights_name not in names:
        raise PipelineError(f"torchvision {arch} has no weights {weights_name!r}; choose one of: "
                            f"{', '.join(names)}, DEFAULT")
    weights = enum.DEFAULT if weights_name == "DEFAULT" else enum[weights_name]
    preset = weights.transforms()
    geometry = Geometry(int(preset.resize_size[0]), int(preset.crop_size[0]), preset.interpolation.value)
    return weights, Transform(tuple(preset.mean), tuple(preset.std), geometry)


def torchvision_teacher(rest: str, num_classes: int) -> Loaded:
    import torchvision

    from pipeline.models import create_torchvision

    arch, _, weights_name = rest.partition(":")
    if weights_name and is_weights_file(weights_name):
        model = load_state_dict_file(create_torchvision(arch, 3, num_classes), weights_name, f"torchvision:{rest}")
        return Loaded(model, arch, f"torchvision:{arch}", None, None)
    weights, transform = torchvision_weights(arch, weights_name)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    try:
        state = weights.get_state_dict(progress=True)
    except Exception as error:  # offline, or a truncated cache file
        raise PipelineError(
            f"weights {weights} are not readable from the torch hub cache ({cached}) and fetching {weights.url} "
            f"failed ({type(error).__name__}); copy the file there or set TORCH_HOME to where it is"
        ) from None
    model = torchvision.models.get_model(arch, weights=None, num_classes=len(weights.meta["categories"]))
    model.load_state_dict(state)
    # no held-out accuracy: the published one is ImageNet val's, this project's test split
    return Loaded(model, arch, f"torchvision:{arch}", transform, None)


def timm_teacher(rest: str, num_classes: int) -> Loaded:
    name, _, weights_file = rest.partition(":")
    try:
        import timm
        import timm.data
    except ImportError:
        raise PipelineError(f"teacher timm:{rest} needs the timm package: pip install timm "
                            "(or pip install -e '.[timm]')") from None
    if weights_file:
        if name not in timm.list_models():
            raise PipelineError(f"timm has no model {name!r}; similar: "
                                f"{', '.join(timm.list_models(f'*{name}*')[:20]) or 'none'}")
        model = load_state_dict_file(timm.create_model(name, pretrained=False, num_classes=num_classes),
                                     weights_file, f"timm:{rest}")
        return Loaded(model, name, f"timm:{name}", timm_transform(model), None)
    if not timm.list_models(name, pretrained=True):
        close = timm.list_models(f"*{name.split('.')[0]}*", pretrained=True)[:20]
        raise PipelineError(f"timm has no pretrained model {name!r}; similar: {', '.join(close) or 'none'}")
    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as error:
        raise PipelineError(f"timm could not load pretrained {name} ({type(error).__name__}: {error}); "
                            "put its weights in the Hugging Face cache (HF_HOME) or run once with internet") from None
    return Loaded(model, name, f"timm:{name}", timm_transform(model), None)


def timm_transform(model: nn.Module) -> Transform:
    """The eval transform timm resolves for `model` (mean, std, resize = crop / crop_pct, crop)."""
    import timm.data

    config = timm.data.resolve_data_config({}, model=model)
    crop = int(config["input_size"][-1])
    geometry = Geometry(int(math.floor(crop / config["crop_pct"])), crop, config["interpolation"])
    return Transform(tuple(config["mean"]), tuple(config["std"]), geometry)
