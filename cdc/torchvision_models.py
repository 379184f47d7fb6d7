"""torchvision's ImageNet architectures as prunable nets: the torchvision classes themselves (so a
torchvision state dict loads as it is), with each block's inner activations as their own modules:
torchvision's blocks reuse one ReLU for every activation, and the scored tensor must be the inner one
alone. Imported when one of them is built (`cdc.models` registers them): importing torchvision's models
costs every process about a second.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import mobilenetv2 as tv_mobilenet
from torchvision.models import resnet as tv_resnet

from cdc.models import PrunableNet, _check_widths


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
        self._block_of = {}  # a bottleneck's conv1 and conv2 are one block
        chains = []
        for s in range(1, 5):
            for b in range(layers[s - 1]):
                for i, conv in enumerate(inner, start=1):
                    path = f"layer{s}.{b}"
                    self._prunable.append(
                        (f"{path}.{conv}", f"{path}.{conv}", f"{path}.bn{i}", f"{path}.relu{i}")
                    )
                    self._block_of[f"{path}.{conv}"] = path
                    chains.append([f"{path}.conv{i + 1}"])
        default = [self.get_submodule(conv).out_channels for _, conv, _, _ in self._prunable]
        for (_, conv, bn, _), consumers, w, d in zip(
            self._prunable, chains, _check_widths(widths, default, arch), default, strict=True
        ):
            if w != d:
                _narrow(self, conv, bn, w, consumers)

    def feature_layers(self) -> list[str]:
        return ["layer1", "layer2", "layer3", "layer4"]


def resnet18(num_classes: int, in_channels: int, widths: list[int] | None = None) -> TorchvisionResNet:
    return TorchvisionResNet(_BasicBlock, [2, 2, 2, 2], "resnet18", num_classes, in_channels, widths)


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


def mobilenet_v2(
    num_classes: int, in_channels: int, widths: list[int] | None = None
) -> TorchvisionMobileNetV2:
    return TorchvisionMobileNetV2(num_classes, in_channels, widths)
