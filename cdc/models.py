"""CNN architectures: the registered ones, built from plain per-layer widths, and any other CNN named by
import path (`package.module:factory`), whose prunable layers are discovered (cdc/discovery.py).

Every model exposes its *prunable layers* in forward order: the conv whose output channels may be
removed and the post-BN-ReLU module whose output is the scored tensor (method §1). A pruned model is
the same architecture with smaller widths, so it reloads from `(arch, widths, state_dict)` alone (an
imported one also from its factory's keyword arguments and layer patterns, saved with it).
"""

from __future__ import annotations

import copy
import importlib
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cdc.errors import InputError
from cdc.registry import Registry

ModelFactory = Callable[..., "PrunableNet"]
MODELS: Registry[ModelFactory] = Registry("model")
register_model = MODELS.register


@dataclass(frozen=True)
class Imported:
    """How an architecture named by import path is built: its factory's keyword arguments, the layer
    patterns (module names, fnmatch) that narrow or widen the discovered prunable layers, and the image
    size the discovery traces the model on (the model must run on it: a fixed-size Linear would not)."""

    kwargs: dict[str, Any] = field(default_factory=dict)
    include: list[str] | None = None
    exclude: list[str] | None = None
    image_size: tuple[int, int] = (32, 32)

    def record(self) -> dict[str, Any]:
        """What a model file keeps (plain values: it loads with `weights_only`)."""
        return {
            "kwargs": dict(self.kwargs),
            "include": self.include,
            "exclude": self.exclude,
            "image_size": list(self.image_size),
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Imported:
        return cls(record["kwargs"], record["include"], record["exclude"], tuple(record["image_size"]))


def is_import_path(arch: str) -> bool:
    return ":" in arch


def build_model(
    arch: str,
    num_classes: int,
    in_channels: int,
    widths: list[int] | None = None,
    imported: Imported | None = None,
) -> PrunableNet:
    """Build `arch`; `widths` (one per prunable layer) gives a pruned architecture."""
    if is_import_path(arch):
        return build_imported(arch, num_classes, in_channels, imported or Imported(), widths)
    return MODELS.get(arch)(num_classes=num_classes, in_channels=in_channels, widths=widths)


@dataclass(frozen=True)
class PrunableLayer:
    """One prunable conv: `conv` loses output channels, `norm` is its BN (the slimming baseline's
    gamma; None without one), `activation` yields the scored tensor at its `call`-th run of `calls`
    per forward (torchvision's blocks run one ReLU module for every activation). `block` is the block
    the layer belongs to: the hierarchy gives every layer of a block the same labels (method §3)."""

    name: str
    conv: nn.Conv2d
    norm: nn.BatchNorm2d | None
    activation: nn.Module
    block: str
    call: int = 0
    calls: int = 1
    function: str | None = None  # a functional activation (torch.nn.functional name) the forward applies


class _Handles:
    def __init__(self, *handles: torch.utils.hooks.RemovableHandle) -> None:
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def hook_layer(
    model: nn.Module,
    layer: PrunableLayer,
    fn: Callable[[torch.Tensor], torch.Tensor | None],
    before: bool = False,
    replace: bool = False,
) -> _Handles:
    """Call `fn` on the layer's scored tensor in every forward of `model` (`before`: on its BN output,
    or its conv output without a BN). With `replace`, the tensor `fn` returns replaces the hooked
    module's output, before a functional activation (every one of FUNCTIONAL keeps a zero a zero).
    Use `.remove()` to stop."""
    module, call, calls = layer.activation, layer.call, layer.calls
    if before:
        module, call, calls = layer.norm or layer.conv, 0, 1
    if layer.function and not before and not replace:
        activation, observe = getattr(nn.functional, layer.function), fn

        def fn(out: torch.Tensor) -> None:
            observe(activation(out))

    if calls == 1:
        return _Handles(module.register_forward_hook(lambda _m, _i, out: fn(out)))
    runs = [0]  # runs of `module` in this forward of `model`

    def reset(*_: object) -> None:
        runs[0] = 0

    def hook(_m: nn.Module, _i: tuple, out: torch.Tensor) -> torch.Tensor | None:
        runs[0] += 1
        return fn(out) if runs[0] == call + 1 else None

    return _Handles(model.register_forward_pre_hook(reset), module.register_forward_hook(hook))


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

    def layer_blocks(self) -> dict[str, list[str]]:
        """Each block's prunable layers, blocks and layers in forward order."""
        out: dict[str, list[str]] = {}
        for layer in self.prunable_layers():
            out.setdefault(layer.block, []).append(layer.name)
        return out

    def discovered(self) -> list:
        """Every prunable conv as `cdc.discovery.Discovered` rows (the prune report, `cdc inspect`):
        here the declared ones; an imported model lists every conv, with why it is left whole."""
        from cdc.discovery import ACTIVATION, PRUNABLE, Discovered

        return [
            Discovered(
                name,
                self.get_submodule(conv).out_channels,
                PRUNABLE,
                "declared",
                (),
                bn,
                act,
                0,
                1,
                ACTIVATION,
                self._block_of.get(name, name),
            )
            for name, conv, bn, act in self._prunable
        ]

    def prunable_widths(self) -> list[int]:
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


# --- any CNN by import path: `package.module:factory`, its prunable layers discovered -----------------


def load_factory(arch: str) -> Callable[..., nn.Module]:
    """The callable `arch` names (`package.module:factory`, the factory may be dotted: `Class.build`).
    Modules are imported from the workspace (the current directory) first, then installed packages."""
    module_name, _, attr = arch.partition(":")
    if not module_name or not attr:
        raise InputError(f"architecture {arch!r}: expected package.module:factory")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise InputError(f"architecture {arch!r}: cannot import {module_name} ({err})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise InputError(f"architecture {arch!r}: {module_name} has no {attr}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise InputError(f"architecture {arch!r}: {attr} is not callable")
    return obj


class ImportedNet(PrunableNet):
    """The methods a model built by an outside factory gains: its class is swapped for a subclass of
    its own and this one (`adopt`), so its state-dict keys, forward and export stay the factory's."""

    _discovered: list  # cdc.discovery.Discovered, every conv in forward order
    _imported: Imported  # how it was built: saved with it (cdc.io.save_model)
    _plans: dict  # prunable layer -> the Torch-Pruning handlers of its group (cdc.discovery.Plan)

    def prunable_layers(self) -> list[PrunableLayer]:
        from cdc.discovery import PRUNABLE

        return [
            PrunableLayer(
                d.name,
                self.get_submodule(d.name),
                self.get_submodule(d.norm) if d.norm else None,
                self.get_submodule(d.tensor),
                d.block,
                d.call,
                d.calls,
                d.function,
            )
            for d in self._discovered
            if d.status == PRUNABLE
        ]

    def discovered(self) -> list:
        return list(self._discovered)

    def feature_layers(self) -> list[str]:
        """The blocks holding prunable layers (each runs once per forward)."""
        return list(self.layer_blocks())

    def dca_layers(self) -> list[str]:
        once = [layer.activation for layer in self.prunable_layers() if layer.calls == 1]
        names = {m: n for n, m in self.named_modules()}
        return self.feature_layers() + [names[m] for m in once]


def _adopt(model: nn.Module, imported: Imported, discovered: list) -> ImportedNet:
    cls = type(model)
    ours = {n for n in vars(ImportedNet) | vars(PrunableNet) if not n.startswith("__")}
    clash = sorted(n for n in ours if n in model._modules or n in vars(model) or hasattr(cls, n))
    if clash and not isinstance(model, ImportedNet):
        raise InputError(f"{cls.__name__} has attributes named like cdc's own ({clash}): rename them")
    if not isinstance(model, ImportedNet):
        model.__class__ = type(cls.__name__, (cls, ImportedNet), {"__module__": cls.__module__})
    model._discovered, model._imported = discovered, imported  # type: ignore[attr-defined]
    return model  # type: ignore[return-value]


def build_imported(
    arch: str, num_classes: int, in_channels: int, imported: Imported, widths: list[int] | None = None
) -> ImportedNet:
    """Build `arch` by its factory (with `num_classes` where the factory takes it), check that it maps
    an `in_channels` image of `imported.image_size` to `num_classes` logits, discover its prunable
    layers, and narrow them to `widths`."""
    from cdc.discovery import PRUNABLE
    from cdc.pruning import prune_channels

    key = (arch, num_classes, in_channels, repr(sorted(imported.record().items())))
    if widths is not None and key in _FULL_MODELS:  # a pruned shape: the weights get overwritten
        net = copy.deepcopy(_FULL_MODELS[key])
    else:
        net = _build_full(arch, num_classes, in_channels, imported)
        if widths is not None:
            _FULL_MODELS[key] = copy.deepcopy(net)
    prunable = [d for d in net._discovered if d.status == PRUNABLE]
    if widths is not None:
        fits = len(widths) == len(prunable) and all(
            1 <= int(w) <= d.width for w, d in zip(widths, prunable, strict=True)
        )
        if not fits:
            raise InputError(
                f"{arch}: expected {len(prunable)} widths, each between 1 and the layer's "
                f"{[d.width for d in prunable]}, got {widths}"
            )
        removals = {d.name: list(range(int(w), d.width)) for d, w in zip(prunable, widths, strict=True)}
        if all(name in net._plans for name, idxs in removals.items() if idxs):
            for name, idxs in removals.items():  # the recorded surgery: no second trace of the graph
                for path, handler in net._plans[name] if idxs else []:
                    handler(net.get_submodule(path), idxs)
        else:
            prune_channels(net, removals, (in_channels, *imported.image_size))
    return net


# Full-width models already built and discovered, by how they were built: a pruned shape (a model file
# being loaded, each candidate of a FLOPs budget) starts from a copy instead of the factory and a trace.
_FULL_MODELS: dict[tuple, ImportedNet] = {}


def _build_full(arch: str, num_classes: int, in_channels: int, imported: Imported) -> ImportedNet:
    from cdc.discovery import discover

    factory = load_factory(arch)
    kwargs = dict(imported.kwargs)
    try:
        accepts = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        accepts = {}
    if "num_classes" in accepts or any(p.kind is p.VAR_KEYWORD for p in accepts.values()):
        kwargs.setdefault("num_classes", num_classes)
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise InputError(
            f"architecture {arch!r}: the factory returned a {type(model).__name__}, not a module"
        )
    example = torch.zeros(2, in_channels, *imported.image_size)
    model.eval()
    try:
        with torch.no_grad():
            out = model(example)
    except Exception as err:  # noqa: BLE001 - any failure of the user's forward is the message
        raise InputError(
            f"architecture {arch!r} does not run on {in_channels}x{imported.image_size[0]}x"
            f"{imported.image_size[1]} images (the dataset's): {type(err).__name__}: {err}"
        ) from None
    if not isinstance(out, torch.Tensor) or out.shape != (2, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InputError(
            f"architecture {arch!r} gives outputs of shape {shape}, expected (batch, {num_classes}) logits "
            "for the dataset's classes (pass num_classes through train_teacher.arch_kwargs?)"
        )
    plans: dict = {}
    found = discover(model, example[:1], imported.include, imported.exclude, plans)
    net = _adopt(model.train(), imported, found)
    net._plans = plans
    return net
