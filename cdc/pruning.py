"""Channel selection under a budget and physical removal through Torch-Pruning (method §3).

Channels are ranked within each layer (no global threshold); the lowest-scored are removed. How many
each layer loses is the budget's choice: a uniform ratio, an explicit list, or `flops_target`, the
FLOP-normalized sensitivity analysis (method §3) that measures what each layer's next cut costs in
validation accuracy per FLOP saved and cuts the cheapest layer, until the target is met. The
surgery goes through Torch-Pruning's dependency graph, so BN and the consuming conv are sliced
consistently; residual streams, the stem and the classifier input are never touched because only
the inner convs are prunable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from math import ceil

import numpy as np
import torch

from cdc.errors import InputError
from cdc.models import PrunableNet, hook_layer
from cdc.registry import Registry


@dataclass
class BudgetProbe:
    """What the FLOPs-targeting budgets measure: the FLOPs of a width vector, the channel scores
    (`global`), and (`flops_target`) the validation accuracy of the unpruned teacher with, per layer,
    every channel beyond the `keep` best-scored silenced."""

    flops: Callable[[list[int]], int]
    scores: Sequence[np.ndarray]
    accuracy: Callable[[list[int]], float] | None = None
    trace: list[dict] = field(default_factory=list)  # one entry per committed cut, for the report


# A budget maps (layer names, current widths, its params, a probe for measuring budgets) -> channels
# to keep per layer.
Budget = Callable[[list[str], list[int], dict, BudgetProbe | None], list[int]]
BUDGETS: Registry[Budget] = Registry("budget")
register_budget = BUDGETS.register


def _keep(width: int, ratio: float) -> int:
    return max(1, width - int(round(ratio * width)))


@register_budget("uniform")
def uniform_budget(
    names: list[str], widths: list[int], params: dict, _probe: BudgetProbe | None = None
) -> list[int]:
    """Remove the same fraction `ratio` of the channels of every prunable layer."""
    return [_keep(w, params["ratio"]) for w in widths]


@register_budget("per_layer")
def per_layer_budget(
    names: list[str], widths: list[int], params: dict, _probe: BudgetProbe | None = None
) -> list[int]:
    """An explicit removal ratio per prunable layer, in forward order."""
    ratios = params["ratios"]
    if ratios is None or len(ratios) != len(widths):
        raise InputError(
            f"prune.ratios must list one ratio per prunable layer ({len(widths)}: {', '.join(names)}), "
            f"got {ratios}"
        )
    return [_keep(w, r) for w, r in zip(widths, ratios, strict=True)]


@register_budget("flops_target")
def flops_target_budget(
    names: list[str], widths: list[int], params: dict, probe: BudgetProbe | None = None
) -> list[int]:
    """Greedy FLOP-normalized sensitivity: each round, every layer proposes cutting the channels worth
    about `sensitivity_step` of the teacher's FLOPs (whole multiples of `round_to`); the cut with the
    smallest accuracy drop per FLOP saved is made. Stops at `flops_target` of the teacher's FLOPs; the
    last cut is sized to land on the target, so the achieved ratio is within one channel group of it.
    """
    if probe is None or probe.accuracy is None:
        raise ValueError("prune.budget flops_target measures validation accuracy: it needs a probe")
    multiple = params.get("round_to", 1)
    full = probe.flops(list(widths))
    goal = params["flops_target"] * full
    step = params["sensitivity_step"] * full
    keep = round_widths(list(widths), widths, multiple)
    floors = [min(w, multiple) for w in widths]
    current, accuracy = probe.flops(keep), probe.accuracy(keep)
    while current > goal:
        wanted = min(step, current - goal)
        best: tuple[float, int, list[int], int, float] | None = None
        for i, (k, floor) in enumerate(zip(keep, floors, strict=True)):
            if k <= floor:
                continue
            fewer = list(keep)
            fewer[i] = k - 1
            per_channel = max(current - probe.flops(fewer), 1)
            fewer[i] = max(k - multiple * ceil(wanted / per_channel / multiple), floor)
            flops = probe.flops(fewer)
            if flops >= current:
                continue
            acc = probe.accuracy(fewer)
            cost = (accuracy - acc) / (current - flops)
            if best is None or cost < best[0]:
                best = (cost, i, fewer, flops, acc)
        if best is None:
            raise InputError(
                f"prune.flops_target {params['flops_target']}: every layer is at its minimum width "
                f"at {current / full:.3f} of the FLOPs"
            )
        cost, i, keep, current, accuracy = best
        probe.trace.append(
            {"layer": names[i], "keep": keep[i], "flops_ratio": current / full, "val_acc": accuracy}
        )
    return keep


@register_budget("global")
def global_budget(
    names: list[str], widths: list[int], params: dict, probe: BudgetProbe | None = None
) -> list[int]:
    """One threshold over every layer's scores (the ablation of per-layer ranking): the lowest-scored
    channels of the whole network are removed, each layer keeping at least one, until the model keeps
    `flops_target` of the FLOPs. Only meaningful when scores are comparable across layers."""
    if probe is None:
        raise ValueError("prune.budget global ranks channels across layers: it needs the scores and FLOPs")
    order = sorted(
        ((float(v), i, c) for i, layer in enumerate(probe.scores) for c, v in enumerate(np.asarray(layer))),
    )
    full = probe.flops(list(widths))
    goal = params["flops_target"] * full

    def keep_after(k: int) -> list[int]:
        keep = list(widths)
        for _, i, _ in order[:k]:
            keep[i] = max(1, keep[i] - 1)
        return keep

    lo, hi = 0, len(order)  # smallest k whose FLOPs meet the goal
    while lo < hi:
        mid = (lo + hi) // 2
        if probe.flops(keep_after(mid)) <= goal:
            hi = mid
        else:
            lo = mid + 1
    return keep_after(lo)


def silencing_probe(
    model: PrunableNet,
    layer_scores: Sequence[np.ndarray],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    flops: Callable[[list[int]], int],
) -> BudgetProbe:
    """A probe on the unpruned `model`: zeroing a post-ReLU channel removes exactly its contribution to
    the next conv, so the accuracy of a cut is measured without rebuilding the network (BN statistics as
    trained, no recalibration: the sensitivity analysis compares layers, not final accuracies)."""
    batches = list(batches)
    layers = model.prunable_layers()
    orders = [torch.from_numpy(np.argsort(-np.asarray(s), kind="stable").copy()) for s in layer_scores]

    def accuracy(keep: list[int]) -> float:
        masks = []
        for layer, order, k in zip(layers, orders, keep, strict=True):
            mask = torch.zeros(layer.conv.out_channels)
            mask[order[:k]] = 1.0
            masks.append(mask.view(1, -1, 1, 1))
        handles = [
            hook_layer(model, layer, lambda out, mask=mask: out * mask.to(out.device), replace=True)
            for layer, mask in zip(layers, masks, strict=True)
        ]
        model.eval()
        correct = total = 0
        try:
            with torch.no_grad():
                for x, y in batches:
                    correct += int((model(x).argmax(1) == y).sum())
                    total += len(y)
        finally:
            for h in handles:
                h.remove()
        return correct / total

    return BudgetProbe(flops, layer_scores, accuracy)


def round_widths(keep: list[int], widths: list[int], multiple: int) -> list[int]:
    """Kept widths rounded to the nearest multiple of `multiple` (ties up), within [multiple, width].

    CPU and GPU kernels process channels in vector-width groups (16 floats for AVX-512), so a layer of
    15 channels costs what one of 16 does: rounding turns the FLOPs cut into time. A layer narrower than
    `multiple` keeps its width.
    """
    if multiple < 1:
        raise InputError(f"round_to must be >= 1, got {multiple}")
    rounded = []
    for k, w in zip(keep, widths, strict=True):
        r = max(multiple, multiple * int(np.floor(k / multiple + 0.5)))
        rounded.append(min(w, r))
    return rounded


def keep_counts(
    budget: str,
    names: list[str],
    widths: list[int],
    params: dict,
    probe: BudgetProbe | None = None,
) -> list[int]:
    """Channels to keep per layer under the budget, rounded to `params["round_to"]` when given."""
    keep = BUDGETS.get(budget)(names, widths, params, probe)
    return round_widths(keep, widths, params.get("round_to", 1))


def channels_to_remove(scores: np.ndarray, keep: int) -> list[int]:
    """Indices of the len(scores) - keep lowest scores; ties broken by lower index first (stable)."""
    order = np.argsort(scores, kind="stable")
    return sorted(int(i) for i in order[: len(scores) - keep])


def prune_channels(
    model: PrunableNet, removals: dict[str, list[int]], input_shape: tuple[int, ...]
) -> PrunableNet:
    """Physically remove `removals[layer]` output channels of each prunable conv, in place."""
    import torch_pruning as tp  # here: it loads timm when installed (2 s for every process otherwise)

    with torch.enable_grad():  # Torch-Pruning traces through autograd
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
