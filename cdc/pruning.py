"""Channel selection under a budget and physical removal through Torch-Pruning (method §3).

Channels are ranked within each layer (no global threshold); the lowest-scored are removed. The
surgery goes through Torch-Pruning's dependency graph, so BN and the consuming conv are sliced
consistently; residual streams, the stem and the classifier input are never touched because only
the inner convs are prunable.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch_pruning as tp

from cdc.models import PrunableNet

# A budget maps (layer names, current widths, its params) -> channels to keep per layer.
Budget = Callable[[list[str], list[int], dict], list[int]]
BUDGETS: dict[str, Budget] = {}


def register_budget(name: str) -> Callable[[Budget], Budget]:
    def add(fn: Budget) -> Budget:
        BUDGETS[name] = fn
        return fn

    return add


def _keep(width: int, ratio: float) -> int:
    return max(1, width - int(round(ratio * width)))


@register_budget("uniform")
def uniform_budget(names: list[str], widths: list[int], params: dict) -> list[int]:
    """Remove the same fraction `ratio` of the channels of every prunable layer."""
    return [_keep(w, params["ratio"]) for w in widths]


@register_budget("per_layer")
def per_layer_budget(names: list[str], widths: list[int], params: dict) -> list[int]:
    """An explicit removal ratio per prunable layer, in forward order."""
    ratios = params["ratios"]
    if ratios is None or len(ratios) != len(widths):
        raise ValueError(
            f"prune.ratios must list one ratio per prunable layer ({len(widths)}: {', '.join(names)}), "
            f"got {ratios}"
        )
    return [_keep(w, r) for w, r in zip(widths, ratios, strict=True)]


def round_widths(keep: list[int], widths: list[int], multiple: int) -> list[int]:
    """Kept widths rounded to the nearest multiple of `multiple` (ties up), within [multiple, width].

    CPU and GPU kernels process channels in vector-width groups (16 floats for AVX-512), so a layer of
    15 channels costs what one of 16 does: rounding turns the FLOPs cut into time. A layer narrower than
    `multiple` keeps its width.
    """
    if multiple < 1:
        raise ValueError(f"round_to must be >= 1, got {multiple}")
    rounded = []
    for k, w in zip(keep, widths, strict=True):
        r = max(multiple, multiple * int(np.floor(k / multiple + 0.5)))
        rounded.append(min(w, r))
    return rounded


def keep_counts(budget: str, names: list[str], widths: list[int], params: dict) -> list[int]:
    """Channels to keep per layer under the budget, rounded to `params["round_to"]` when given."""
    if budget not in BUDGETS:
        raise KeyError(f"unknown budget {budget!r}; known: {', '.join(sorted(BUDGETS))}")
    keep = BUDGETS[budget](names, widths, params)
    return round_widths(keep, widths, params.get("round_to", 1))


def channels_to_remove(scores: np.ndarray, keep: int) -> list[int]:
    """Indices of the len(scores) - keep lowest scores; ties broken by lower index first (stable)."""
    order = np.argsort(scores, kind="stable")
    return sorted(int(i) for i in order[: len(scores) - keep])


def prune_channels(
    model: PrunableNet, removals: dict[str, list[int]], input_shape: tuple[int, ...]
) -> PrunableNet:
    """Physically remove `removals[layer]` output channels of each prunable conv, in place."""
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, *input_shape))
    for layer in model.prunable_layers():
        idxs = removals.get(layer.name, [])
        if not idxs:
            continue
        group = graph.get_pruning_group(layer.conv, tp.prune_conv_out_channels, idxs=idxs)
        if not graph.check_pruning_group(group):
            raise RuntimeError(f"Torch-Pruning refused to prune {layer.name} (would remove every channel)")
        group.prune()
    return model
