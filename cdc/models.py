"""CNN architectures behind a registry, built from plain per-layer widths.

Every model exposes its *prunable layers* in forward order: the conv whose output channels may be
removed and the post-BN-ReLU module whose output is the scored tensor (method §1). A pruned model is
the same class built with smaller widths, so it reloads from `(arch, widths, state_dict)` alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from cdc.errors import InputError
from cdc.registry import Registry

ModelFactory = Callable[..., "PrunableNet"]
MODELS: Registry[ModelFactory] = Registry("model")
register_model = MODELS.register


def build_model(
    arch: str, num_classes: int, in_channels: int, widths: list[int] | None = None
) -> PrunableNet:
    """Build `arch`; `widths` (one per prunable layer) gives a pruned architecture."""
    return MODELS.get(arch)(num_classes=num_classes, in_channels=in_channels, widths=widths)


@dataclass(frozen=True)
class PrunableLayer:
    """One prunable conv: `conv` loses output channels, `norm` is its BN (the slimming baseline's
    gamma), `activation` yields the scored tensor. `block` is the block the layer belongs to: the
    hierarchy gives every layer of a block the same labels (method §3)."""

    name: str
    conv: nn.Conv2d
    norm: nn.BatchNorm2d
    activation: nn.Module
    block: str


class PrunableNet(nn.Module):
    """Base class: subclasses fill `self._prunable` in forward order, and `self._block_of` where a block
    holds more than one prunable layer (by default each layer is a block of its own)."""

    _prunable: list[tuple[str, str, str, str]]  # (layer name, conv, BN, activation paths)
    _block_of: dict[str, str] = {}  # layer name -> its block's name

    def prunable_layers(self) -> list[PrunableLayer]:
        return [
            PrunableLayer(
                name,
                self.get_submodule(conv),
                self.get_submodule(bn),
                self.get_submodule(act),
                self._block_of.get(name, name),
            )
            for name, conv, bn, act in self._prunable
        ]

    def blocks(self) -> dict[str, list[str]]:
        """Each block's prunable layers, blocks and layers in forward order."""
        out: dict[str, list[str]] = {}
        for layer in self.prunable_layers():
            out.setdefault(layer.block, []).append(layer.name)
        return out

    def widths(self) -> list[int]:
        return [layer.conv.out_channels for layer in self.prunable_layers()]

    def feature_layers(self) -> list[str]:
        """Module paths whose outputs keep their shape in a pruned model (stage outputs)."""
        raise NotImplementedError

    def dca_layers(self) -> list[str]:
        """Module paths whose outputs may serve as DCA features: the feature layers, and the activation
        of every prunable layer, whose width pruning changes (teacher and student each get their own
        basis; the released code distils ResNet-56's `Res16_2`, here `layer1.2.relu1`)."""
        return self.feature_layers() + [activation for _, _, _, activation in self._prunable]


def _check_widths(widths: list[int] | None, default: list[int], arch: str) -> list[int]:
    if widths is None:
        return list(default)
    if len(widths) != len(default) or any(int(w) < 1 for w in widths):
        raise InputError(f"{arch}: expected {len(default)} positive widths, got {widths}")
    return [int(w) for w in widths]


class BasicBlock(nn.Module):
    """CIFAR ResNet basic block; the inner width (conv1 outputs) is the prunable part."""

    def __init__(self, in_planes: int, inner: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, inner, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(inner, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            # Projection shortcut (option B): traceable by Torch-Pruning, unlike zero-padding.
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNetCifar(PrunableNet):
    """ResNet-(6n+2) of He et al. for 32x32-ish inputs: three stages of 16/32/64 channels."""

    def __init__(
        self, depth: int, num_classes: int, in_channels: int, widths: list[int] | None = None
    ) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        stage_planes = [16, 32, 64]
        inner = _check_widths(widths, [p for p in stage_planes for _ in range(n)], f"resnet{depth}")
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self._prunable = []
        in_planes, k = 16, 0
        for s, planes in enumerate(stage_planes):
            blocks = []
            for b in range(n):
                stride = 2 if (s > 0 and b == 0) else 1
                blocks.append(BasicBlock(in_planes, inner[k], planes, stride))
                path = f"layer{s + 1}.{b}"
                self._prunable.append((path, f"{path}.conv1", f"{path}.bn1", f"{path}.relu1"))
                in_planes, k = planes, k + 1
            self.add_module(f"layer{s + 1}", nn.Sequential(*blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))

    def feature_layers(self) -> list[str]:
        return ["layer1", "layer2", "layer3"]


@register_model("resnet20")
def resnet20(num_classes: int, in_channels: int, widths: list[int] | None = None) -> ResNetCifar:
    return ResNetCifar(20, num_classes, in_channels, widths)


@register_model("resnet56")
def resnet56(num_classes: int, in_channels: int, widths: list[int] | None = None) -> ResNetCifar:
    return ResNetCifar(56, num_classes, in_channels, widths)


class VGG(PrunableNet):
    """VGG with BN for small images. Every conv but the last is prunable (the last feeds the classifier)."""

    def __init__(
        self, cfg: list[int | str], num_classes: int, in_channels: int, widths: list[int] | None = None
    ) -> None:
        super().__init__()
        convs = [c for c in cfg if c != "M"]
        prunable = _check_widths(widths, [int(c) for c in convs[:-1]], "vgg")
        out_widths = prunable + [int(convs[-1])]
        layers: list[nn.Module] = []
        self._prunable = []
        c_in, k = in_channels, 0
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            c_out = out_widths[k]
            i = len(layers)
            layers += [
                nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
            if k < len(prunable):
                paths = (f"features.{i}", f"features.{i}", f"features.{i + 1}", f"features.{i + 2}")
                self._prunable.append(paths)
            c_in, k = c_out, k + 1
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))

    def feature_layers(self) -> list[str]:
        return [f"features.{i}" for i, m in self.features.named_children() if isinstance(m, nn.MaxPool2d)]


VGG_SMALL = [32, 32, "M", 64, 64, "M", 128, 128]
VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]


@register_model("vgg_small")
def vgg_small(num_classes: int, in_channels: int, widths: list[int] | None = None) -> VGG:
    return VGG(VGG_SMALL, num_classes, in_channels, widths)


@register_model("vgg16")
def vgg16(num_classes: int, in_channels: int, widths: list[int] | None = None) -> VGG:
    return VGG(VGG16, num_classes, in_channels, widths)


# --- torchvision's ImageNet architectures (cdc/torchvision_models.py, imported when one is built) -----


def _torchvision(name: str) -> ModelFactory:
    def build(num_classes: int, in_channels: int, widths: list[int] | None = None) -> PrunableNet:
        from cdc import torchvision_models

        return getattr(torchvision_models, name)(num_classes, in_channels, widths)

    build.__name__ = build.__qualname__ = name
    return build


for _name in ("resnet18", "resnet50", "mobilenet_v2"):
    MODELS.add(_name, _torchvision(_name))
