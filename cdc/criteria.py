"""Every channel-scoring criterion behind one registry (`score.criterion`), so that the class
discriminants and the baselines they are compared with go through the same `score` -> `prune` path.

A criterion reads one *source*:
- `stats`: the per-class scalar statistics (the class discriminants of cdc.discriminants, and `random`);
- `grid`: the per-class pooled-grid statistics (`di`);
- `weights`: the teacher's weights, data-free (`l1` filter norm, Li et al. 2017; `bn_gamma` |gamma|,
  network slimming; Torch-Pruning's group importances `tp_magnitude` and `tp_fpgm`, which score a channel
  over its whole dependency group: the conv's filter, its BN and the next conv's input slice);
- `gradients`: first-order Taylor importance |sum over pixels of activation x dLoss/dactivation| per
  image, averaged over training images (Molchanov et al. 2017), on training batches.
Only `stats` and `grid` criteria use class labels, hence the coarse/fine hierarchy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from cdc.discriminants import DISCRIMINANTS, di
from cdc.errors import InputError
from cdc.models import PrunableLayer, PrunableNet, hook_layer
from cdc.registry import Registry

Source = Literal["stats", "grid", "weights", "gradients"]


@dataclass(frozen=True)
class Criterion:
    name: str
    source: Source
    class_discriminant: bool  # whether it reads class labels (and so the hierarchy applies)


CRITERIA: Registry[Criterion] = Registry("criterion", "criteria")
for _criterion in (
    *(Criterion(name, "stats", class_discriminant=name != "random") for name in DISCRIMINANTS),
    Criterion("di", "grid", class_discriminant=True),
    Criterion("l1", "weights", class_discriminant=False),
    Criterion("bn_gamma", "weights", class_discriminant=False),
    Criterion("tp_magnitude", "weights", class_discriminant=False),
    Criterion("tp_fpgm", "weights", class_discriminant=False),
    Criterion("taylor", "gradients", class_discriminant=False),
):
    CRITERIA.add(_criterion.name, _criterion)
GRID_DISCRIMINANTS: Registry[Callable] = Registry("grid discriminant")
GRID_DISCRIMINANTS.add("di", di)


def _tp_scores(importance_name: str) -> Callable[[PrunableNet, tuple[int, ...]], dict[str, np.ndarray]]:
    """A Torch-Pruning importance (`tp.importance.<importance_name>`, L2) per channel of each layer.
    Torch-Pruning is imported here, not with the module: it loads timm when installed (2 s a process)."""

    def scores(model: PrunableNet, input_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
        import torch_pruning as tp

        importance = getattr(tp.importance, importance_name)(p=2)
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, *input_shape))
        out = {}
        for layer in model.prunable_layers():
            idxs = list(range(layer.conv.out_channels))
            group = graph.get_pruning_group(layer.conv, tp.prune_conv_out_channels, idxs=idxs)
            out[layer.name] = importance(group).detach().double().cpu().numpy()
        return out

    return scores


def _norm(layer: PrunableLayer) -> torch.nn.BatchNorm2d:
    if layer.norm is None:
        raise InputError(
            f"criterion bn_gamma: layer {layer.name} has no BatchNorm (choose another criterion)"
        )
    return layer.norm


def _per_layer(fn: Callable) -> Callable[[PrunableNet, tuple[int, ...]], dict[str, np.ndarray]]:
    def scores(model: PrunableNet, _input_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
        return {layer.name: fn(layer).detach().double().cpu().numpy() for layer in model.prunable_layers()}

    return scores


WEIGHT_CRITERIA: Registry[Callable[[PrunableNet, tuple[int, ...]], dict[str, np.ndarray]]] = Registry(
    "weight criterion", "weight criteria"
)
WEIGHT_CRITERIA.add("l1", _per_layer(lambda layer: layer.conv.weight.abs().sum((1, 2, 3))))
WEIGHT_CRITERIA.add("bn_gamma", _per_layer(lambda layer: _norm(layer).weight.abs()))
WEIGHT_CRITERIA.add("tp_magnitude", _tp_scores("GroupMagnitudeImportance"))
WEIGHT_CRITERIA.add("tp_fpgm", _tp_scores("FPGMImportance"))


def weight_scores(name: str, model: PrunableNet, input_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Data-free scores of every prunable layer's channels, keyed by layer name in forward order.
    (Gradients stay enabled: Torch-Pruning traces its dependency graph through autograd.)"""
    return WEIGHT_CRITERIA.get(name)(model, input_shape)


def taylor_scores(
    model: PrunableNet, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], max_batches: int
) -> dict[str, np.ndarray]:
    """First-order Taylor importance of each scored channel, eval-mode BN, summed cross-entropy."""
    model.eval()
    layers = model.prunable_layers()
    totals = {layer.name: torch.zeros(layer.conv.out_channels, dtype=torch.float64) for layer in layers}
    images = 0

    def hook(name: str) -> Callable:
        def forward_hook(out: torch.Tensor) -> None:
            act = out.detach()

            def backward_hook(grad: torch.Tensor) -> None:
                totals[name] += (act * grad).sum((2, 3)).abs().sum(0).double().cpu()

            out.register_hook(backward_hook)

        return forward_hook

    handles = [hook_layer(model, layer, hook(layer.name)) for layer in layers]
    try:
        for i, (x, y) in enumerate(batches):
            if i == max_batches:
                break
            model.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
            images += len(y)
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    if images == 0:
        raise InputError("taylor scores need at least one training batch")
    return {name: (t / images).numpy() for name, t in totals.items()}
