"""Model registry: `create_model("resnet20", in_channels=1, num_classes=10)`.

Besides the small networks, `torchvision:<arch>` builds any torchvision classification
architecture (randomly initialised; teachers.py loads pretrained weights).
"""

from torch import nn

from pipeline.errors import PipelineError
from pipeline.models import small
from pipeline.registry import Registry

MODELS = Registry("model")
for _name in ("resnet8", "resnet8_slim", "resnet20", "resnet32x4", "wrn16_2", "vgg8_bn", "vgg8"):
    MODELS.register(_name)(getattr(small, _name))


def torchvision_architectures() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def create_torchvision(arch: str, in_channels: int, num_classes: int) -> nn.Module:
    import torchvision

    if arch not in torchvision_architectures():
        raise PipelineError(f"unknown torchvision architecture {arch!r}; choose one of: "
                            f"{', '.join(torchvision_architectures())}")
    if in_channels != 3:
        raise PipelineError(f"torchvision:{arch} takes RGB images, not {in_channels} channel(s); "
                            "use a data set with colour images or a model from: " + ", ".join(MODELS.names()))
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


MODELS.register("torchvision:<arch>")(create_torchvision)


def create_model(name: str, in_channels: int, num_classes: int) -> nn.Module:
    source, _, arch = name.partition(":")
    if source == "torchvision" and arch:
        return create_torchvision(arch, in_channels, num_classes)
    return MODELS.get(name)(in_channels=in_channels, num_classes=num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["MODELS", "count_parameters", "create_model", "torchvision_architectures"]
