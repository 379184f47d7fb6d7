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
from torchvision.models import mobilenetv2 as tv_mobilenet
from torchvision.models import resnet as tv_resnet

ModelFactory = Callable[..., "PrunableNet"]
MODELS: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    def add(factory: ModelFactory) -> ModelFactory:
        MODELS[name] = factory
        return factory

    return add


def build_model(
    arch: str, num_classes: int, in_channels: int, widths: list[int] | None = None
) -> PrunableNet:
    """Build `arch`; `widths` (one per prunable layer) gives a pruned architecture."""
    if arch not in MODELS:
        raise KeyError(f"unknown model {arch!r}; known models: {', '.join(sorted(MODELS))}")
    return MODELS[arch](num_classes=num_classes, in_channels=in_channels, widths=widths)


@dataclass(frozen=True)
class PrunableLayer:
    """One prunable conv: `conv` loses output channels, `norm` is its BN (the slimming baseline's
    gamma), `activation` yields the scored tensor."""

    name: str
    conv: nn.Conv2d
    norm: nn.BatchNorm2d
    activation: nn.Module


class PrunableNet(nn.Module):
    """Base class: subclasses fill `self._prunable` in forward order."""

    _prunable: list[tuple[str, str, str, str]]  # (layer name, conv, BN, activation paths)

    def prunable_layers(self) -> list[PrunableLayer]:
        return [
            PrunableLayer(name, self.get_submodule(conv), self.get_submodule(bn), self.get_submodule(act))
            for name, conv, bn, act in self._prunable
        ]

    def widths(self) -> list[int]:
        return [layer.conv.out_channels for layer in self.prunable_layers()]

    def feature_layers(self) -> list[str]:
        """Module paths whose outputs may serve as DCA features (the same shape in a pruned model)."""
        raise NotImplementedError


def _check_widths(widths: list[int] | None, default: list[int], arch: str) -> list[int]:
    if widths is None:
        return list(default)
    if len(widths) != len(default) or any(int(w) < 1 for w in widths):
        raise ValueError(f"{arch}: expected {len(default)} positive widths, got {widths}")
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


# --- torchvision's ImageNet architectures ----------------------------------------------------------
# The torchvision classes themselves (so a torchvision state dict loads as it is), with each block's
# inner activations as their own modules: torchvision's blocks reuse one ReLU for every activation,
# and the scored tensor must be the inner one alone.


class _BasicBlock(tv_resnet.BasicBlock):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.relu1 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class _Bottleneck(tv_resnet.Bottleneck):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.relu1, self.relu2 = nn.ReLU(inplace=True), nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn3(self.conv3(self.relu2(self.bn2(self.conv2(out)))))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


def _narrow(model: nn.Module, conv: str, bn: str, width: int, consumers: list[str]) -> None:
    """Rebuild `conv` with `width` output channels, its BN, and the modules reading them (convs, a
    depthwise conv with its BN): the pruned architecture's shapes, for its state dict to load into."""

    def replace(path: str, module: nn.Module) -> None:
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, module)

    def conv_like(old: nn.Conv2d, c_in: int, c_out: int, groups: int) -> nn.Conv2d:
        return nn.Conv2d(
            c_in, c_out, old.kernel_size, old.stride, old.padding, old.dilation, groups, old.bias is not None
        )

    old = model.get_submodule(conv)
    replace(conv, conv_like(old, old.in_channels, width, old.groups))
    replace(bn, nn.BatchNorm2d(width))
    for path in consumers:
        m = model.get_submodule(path)
        if isinstance(m, nn.BatchNorm2d):
            replace(path, nn.BatchNorm2d(width))
        elif m.groups > 1:  # depthwise: its channels are the pruned conv's
            replace(path, conv_like(m, width, width, width))
        else:
            replace(path, conv_like(m, width, m.out_channels, 1))


class TorchvisionResNet(tv_resnet.ResNet, PrunableNet):
    """torchvision's ResNet-18/50 (random init); prunable: each block's inner convs (BasicBlock conv1,
    Bottleneck conv1 and conv2). The residual stream, stem and classifier input keep their widths."""

    def __init__(
        self,
        block: type[nn.Module],
        layers: list[int],
        arch: str,
        num_classes: int,
        in_channels: int,
        widths: list[int] | None = None,
    ) -> None:
        super().__init__(block, layers, num_classes=num_classes)  # type: ignore[arg-type]
        if in_channels != 3:
            self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        inner = ["conv1"] if block is _BasicBlock else ["conv1", "conv2"]
        self._prunable = []
        chains = []
        for s in range(1, 5):
            for b in range(layers[s - 1]):
                for i, conv in enumerate(inner, start=1):
                    path = f"layer{s}.{b}"
                    self._prunable.append(
                        (f"{path}.{conv}", f"{path}.{conv}", f"{path}.bn{i}", f"{path}.relu{i}")
                    )
                    chains.append([f"{path}.conv{i + 1}"])
        default = [self.get_submodule(conv).out_channels for _, conv, _, _ in self._prunable]
        for (_, conv, bn, _), consumers, w, d in zip(
            self._prunable, chains, _check_widths(widths, default, arch), default, strict=True
        ):
            if w != d:
                _narrow(self, conv, bn, w, consumers)

    def feature_layers(self) -> list[str]:
        return ["layer1", "layer2", "layer3", "layer4"]


@register_model("resnet18")
def resnet18(num_classes: int, in_channels: int, widths: list[int] | None = None) -> TorchvisionResNet:
    return TorchvisionResNet(_BasicBlock, [2, 2, 2, 2], "resnet18", num_classes, in_channels, widths)


@register_model("resnet50")
def resnet50(num_classes: int, in_channels: int, widths: list[int] | None = None) -> TorchvisionResNet:
    return TorchvisionResNet(_Bottleneck, [3, 4, 6, 3], "resnet50", num_classes, in_channels, widths)


class TorchvisionMobileNetV2(tv_mobilenet.MobileNetV2, PrunableNet):
    """torchvision's MobileNetV2 (random init); prunable: each inverted residual's 1x1 expansion (its
    depthwise conv follows the kept channels). Block outputs, the residual stream, keep their widths."""

    def __init__(self, num_classes: int, in_channels: int, widths: list[int] | None = None) -> None:
        super().__init__(num_classes=num_classes)
        if in_channels != 3:
            self.features[0][0] = nn.Conv2d(in_channels, 32, 3, 2, 1, bias=False)
        self._prunable = []
        for i, block in enumerate(self.features):
            if isinstance(block, tv_mobilenet.InvertedResidual) and len(block.conv) == 4:  # expand_ratio > 1
                p = f"features.{i}.conv"
                self._prunable.append((f"{p}.0", f"{p}.0.0", f"{p}.0.1", f"{p}.0.2"))
        default = [self.get_submodule(conv).out_channels for _, conv, _, _ in self._prunable]
        for (name, conv, bn, _), w, d in zip(
            self._prunable, _check_widths(widths, default, "mobilenet_v2"), default, strict=True
        ):
            if w != d:
                block = name.removesuffix(".0")
                _narrow(self, conv, bn, w, [f"{block}.1.0", f"{block}.1.1", f"{block}.2"])

    def feature_layers(self) -> list[str]:
        return ["features.3", "features.6", "features.13", "features.17"]  # the ends of the strides


@register_model("mobilenet_v2")
def mobilenet_v2(
    num_classes: int, in_channels: int, widths: list[int] | None = None
) -> TorchvisionMobileNetV2:
    return TorchvisionMobileNetV2(num_classes, in_channels, widths)
