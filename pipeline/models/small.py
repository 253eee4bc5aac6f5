"""Small CIFAR-style networks, usable as teachers and students.

Every network here names its Grad-CAM layer (`cam_layer`, the last 4-D feature map).
explain.py takes the closed-form Grad-CAM path where it finds a global-average-pool +
Linear head; `vgg8_bn` deliberately has a flatten + MLP head, so the default teacher set
exercises the autograd path too.
"""

import torch
from torch import nn


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class BasicBlock(nn.Module):
    """Post-activation ResNet block (He et al. 2016, CIFAR variant with 1x1 projection shortcuts)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            *conv_bn_relu(c_in, c_out, stride),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation block used by wide ResNets (Zagoruyko & Komodakis 2016)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu(self.bn1(x))
        out = self.conv2(torch.relu(self.bn2(self.conv1(pre))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class GapLinearNet(nn.Module):
    """features -> global average pool -> Linear: the head that admits closed-form Grad-CAM."""

    cam_layer = "features"

    def __init__(self, features: nn.Sequential, width: int, num_classes: int):
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def stages(block: type[nn.Module], widths: tuple[int, ...], depth_per_stage: int, c_in: int) -> list[nn.Module]:
    layers = []
    for i, width in enumerate(widths):
        for j in range(depth_per_stage):
            layers.append(block(c_in, width, 2 if (i > 0 and j == 0) else 1))
            c_in = width
    return layers


def cifar_resnet(depth: int, widths: tuple[int, int, int], in_channels: int, num_classes: int,
                 stem: int | None = None) -> GapLinearNet:
    """ResNet-(6n+2) for 32x32 inputs: a `stem`-wide first conv (default: the first stage's width), then 3 stages
    of n basic blocks, 32 -> 16 -> 8 px."""
    n, stem = (depth - 2) // 6, stem or widths[0]
    features = nn.Sequential(*conv_bn_relu(in_channels, stem), *stages(BasicBlock, widths, n, stem))
    return GapLinearNet(features, widths[-1], num_classes)


def resnet8(in_channels: int, num_classes: int) -> nn.Module:
    return cifar_resnet(8, (16, 32, 64), in_channels, num_classes)


def resnet8_slim(in_channels: int, num_classes: int) -> nn.Module:
    """Half-width ResNet-8 (about 20k parameters): the default student."""
    return cifar_resnet(8, (8, 16, 32), in_channels, num_classes)


def resnet20(in_channels: int, num_classes: int) -> nn.Module:
    return cifar_resnet(20, (16, 32, 64), in_channels, num_classes)


def resnet32x4(in_channels: int, num_classes: int) -> nn.Module:
    """The CRD/CA-MKD code's resnet32x4 (7.43 M parameters at 100 classes): a 32-wide stem, stages of 5 blocks 64,
    128 and 256 wide."""
    return cifar_resnet(32, (64, 128, 256), in_channels, num_classes, stem=32)


def wrn16_2(in_channels: int, num_classes: int) -> nn.Module:
    """Wide ResNet 16-2: pre-activation blocks, the final BN + ReLU belong to `features`."""
    widths = (32, 64, 128)
    features = nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False),
        *stages(PreActBlock, widths, 2, 16),
        nn.BatchNorm2d(widths[-1]),
        nn.ReLU(inplace=True),
    )
    return GapLinearNet(features, widths[-1], num_classes)


class VGG(nn.Module):
    """VGG-style conv/BN/ReLU stack with max-pooling and a flatten + MLP head (no GAP)."""

    cam_layer = "features"

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        layers, c_in = [], in_channels
        for spec in (32, "M", 64, "M", 128, 128, "M"):
            if spec == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += conv_bn_relu(c_in, spec)
                c_in = spec
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(  # 4x4 cells whatever the image size (identity at 32 px)
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(c_in * 16, 256), nn.ReLU(inplace=True),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def vgg8_bn(in_channels: int, num_classes: int) -> nn.Module:
    return VGG(in_channels, num_classes)


def vgg8(in_channels: int, num_classes: int) -> nn.Module:
    """The CRD/CA-MKD code's `vgg8` student (their model table maps the name to vgg8_bn; 3.97 M parameters at 100
    classes): one conv (with bias, as theirs) + BN + ReLU per stage, 64, 128, 256, 512, 512 wide, max-pooled after
    the first three (32 -> 4 px; their extra pool for 64 px inputs is left out), global average pool, Linear."""
    layers, c_in = [], in_channels
    for stage, width in enumerate((64, 128, 256, 512, 512)):
        layers += [nn.Conv2d(c_in, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        layers += [nn.MaxPool2d(2)] if stage < 3 else []
        c_in = width
    return GapLinearNet(nn.Sequential(*layers), c_in, num_classes)
