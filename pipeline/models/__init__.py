"""Model registry: `create_model("resnet20", in_channels=1, num_classes=10)`."""

from torch import nn

from pipeline.models import small
from pipeline.registry import Registry

MODELS = Registry("model")
for _name in ("resnet8", "resnet8_slim", "resnet20", "wrn16_2", "vgg8_bn"):
    MODELS.register(_name)(getattr(small, _name))


def create_model(name: str, in_channels: int, num_classes: int) -> nn.Module:
    return MODELS.get(name)(in_channels=in_channels, num_classes=num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["MODELS", "count_parameters", "create_model"]
