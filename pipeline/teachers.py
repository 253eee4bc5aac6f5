"""Teacher specs -> models ready for extraction, with their transform and Grad-CAM layer.

    checkpoint:<path> (or a bare path)   a checkpoint of a registered architecture
    torchvision:<arch>:<weights>         torchvision pretrained weights, e.g. resnet50:IMAGENET1K_V2
    timm:<name>                          timm pretrained weights (needs the optional timm package)

Pretrained weights are read from the torch hub cache (TORCH_HOME), downloaded there only
when missing; a teacher carries the eval transform its weights were trained with.
"""

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from pipeline.data import DatasetInfo, Geometry
from pipeline.errors import PipelineError
from pipeline.explain import CamLayer, captured, probe_input
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
    transform: Transform
    held_out_top1: float | None


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


def parse_target_layers(items: list[str]) -> dict[str, str]:
    """["resnet50=layer4", ...] -> {"resnet50": "layer4"}."""
    layers = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not (sep and name and path):
            raise PipelineError(f"--target-layer takes <teacher>=<module.path>, e.g. vgg11=features.20; got {item!r}")
        layers[name.strip()] = path.strip()
    return layers


def load_teacher(spec: str, info: DatasetInfo, target_layers: dict[str, str] | None = None) -> Teacher:
    """Build the teacher of `spec` for data set `info`, find its Grad-CAM layer and map size."""
    source, _, rest = spec.partition(":")
    if source == "torchvision":
        loaded = torchvision_teacher(rest)
    elif source == "timm":
        loaded = timm_teacher(rest)
    elif source == "checkpoint" or not rest or Path(spec).suffix:
        loaded = checkpoint_teacher(spec.removeprefix("checkpoint:"))
    else:
        raise PipelineError(f"unknown teacher source {source!r} in {spec!r}; choose one of: "
                            f"{', '.join(SOURCES)} (or a checkpoint path)")
    model, name = loaded.model.eval(), loaded.name
    # image-file data sets decode at each teacher's own resize/crop; in-memory ones have one size
    geometry = (loaded.transform.geometry or info.geometry) if info.geometry else None
    transform = Transform(loaded.transform.mean, loaded.transform.std, geometry)
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
        "heldout_top1": loaded.held_out_top1, "map_shape": list(box["activation"].shape[-2:]),
    }
    return Teacher(name, model, layer, transform, identity)


def checkpoint_teacher(path: str) -> Loaded:
    model, record = load_checkpoint(path)
    t = record["transform"]
    geometry = Geometry(t["resize"], t["crop"], t.get("interpolation", "bilinear")) if "crop" in t else None
    metrics = record.get("metrics", {})  # held out: validation accuracy where the data set has a val split
    return Loaded(model, record["name"], record["arch"], Transform(tuple(t["mean"]), tuple(t["std"]), geometry),
                  metrics.get("val_top1", metrics.get("top1")))


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


def torchvision_teacher(rest: str) -> Loaded:
    import torchvision

    arch, _, weights_name = rest.partition(":")
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
    metrics = next(iter(weights.meta.get("_metrics", {}).values()), {})
    held_out = metrics["acc@1"] / 100 if "acc@1" in metrics else None
    return Loaded(model, arch, f"torchvision:{arch}", transform, held_out)


def timm_teacher(name: str) -> Loaded:
    try:
        import timm
        import timm.data
    except ImportError:
        raise PipelineError(f"teacher timm:{name} needs the timm package: pip install timm "
                            "(or pip install -e '.[timm]')") from None
    if not timm.list_models(name, pretrained=True):
        close = timm.list_models(f"*{name.split('.')[0]}*", pretrained=True)[:20]
        raise PipelineError(f"timm has no pretrained model {name!r}; similar: {', '.join(close) or 'none'}")
    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as error:
        raise PipelineError(f"timm could not load pretrained {name} ({type(error).__name__}: {error}); "
                            "put its weights in the Hugging Face cache (HF_HOME) or run once with internet") from None
    config = timm.data.resolve_data_config({}, model=model)
    crop = int(config["input_size"][-1])
    geometry = Geometry(int(math.floor(crop / config["crop_pct"])), crop, config["interpolation"])
    return Loaded(model, name, f"timm:{name}", Transform(tuple(config["mean"]), tuple(config["std"]), geometry), None)
