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
from typing import TYPE_CHECKING

import numpy as np
import torch

from cdc.errors import InputError
from cdc.models import PrunableNet, hook_layer
from cdc.registry import Registry

if TYPE_CHECKING:
    from cdc.latency_model import LatencyTable


@dataclass
class BudgetProbe:
    """What the measuring budgets read: the FLOPs of a width vector, the channel scores (`global`), the
    validation accuracy of the unpruned teacher with, per layer, every channel beyond the `keep`
    best-scored silenced (`flops_target`, `latency_target`), and the target's latency table."""

    flops: Callable[[list[int]], int]
    scores: Sequence[np.ndarray]
    accuracy: Callable[[list[int]], float] | None = None
    latency: LatencyTable | None = None  # `latency_target`: the target's table
    trace: list[dict] = field(default_factory=list)  # one entry per committed cut, for the report


# A budget maps (layer names, current widths, its params, a probe for measuring budgets) -> channels
# to keep per layer.
Budget = Callable[[list[str], list[int], dict, BudgetProbe | None], list[int]]
BUDGETS: Registry[Budget] = Registry("budget")


@dataclass(frozen=True)
class BudgetReads:
    """What a budget reads besides widths and params, so the stages measure it only for the budgets
    that read it (and a user's budget declares it where it registers)."""

    accuracy: bool = False  # validation accuracy with channels silenced: a sensitivity search
    latency: bool = False  # the target's latency table (stage latency_table measures it)
    flops_target: bool = False  # aims at prune.flops_target (the prune report gives it)


_READS: dict[str, BudgetReads] = {}


def register_budget(name: str, reads: BudgetReads = BudgetReads()) -> Callable[[Budget], Budget]:
    """Decorator: `@register_budget("half_late")` above the budget, with what it reads."""

    def add(budget: Budget) -> Budget:
        _READS[name] = reads
        return BUDGETS.add(name, budget)

    return add


def budget_reads(name: str) -> BudgetReads:
    """What budget `name` reads; unknown names raise, listing the known ones."""
    BUDGETS.get(name)
    return _READS[name]


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


@register_budget("flops_target", BudgetReads(accuracy=True, flops_target=True))
def flops_target_budget(
    names: list[str], widths: list[int], params: dict, probe: BudgetProbe | None = None
) -> list[int]:
    """Greedy FLOP-normalized sensitivity: each round, every layer proposes cutting the channels worth
    about `sensitivity_step` of the teacher's FLOPs (whole multiples of `round_to`); the cut with the
    smallest accuracy drop per FLOP saved is made. Stops at `flops_target` of the teacher's FLOPs; the
    last cut is sized to land on the target, so the achieved ratio is within one channel group of it.
    """
    multiple = params.get("round_to", 1)
    floors = [min(w, multiple) for w in widths]

    def narrower(i: int, keep: list[int], wanted: float, current: float, flops: Cost) -> int | None:
        if keep[i] <= floors[i]:
            return None
        per_channel = max(current - flops(_with(keep, i, keep[i] - 1)), 1)
        return max(keep[i] - multiple * ceil(wanted / per_channel / multiple), floors[i])

    assert probe is not None  # _sensitivity_search says why when it is missing
    start = round_widths(list(widths), widths, multiple)
    return _sensitivity_search(names, start, params, probe, "flops", narrower)


@register_budget("latency_target", BudgetReads(accuracy=True, latency=True))
def latency_target_budget(
    names: list[str], widths: list[int], params: dict, probe: BudgetProbe | None = None
) -> list[int]:
    """The FLOP-normalized sensitivity search with time in place of FLOPs: accuracy lost per millisecond
    of predicted latency saved (`probe.latency`, a table measured on the target), each layer cut only to
    widths the table shows are faster than every wider one (`LatencyTable.fast_widths`). Stops once the
    predicted latency is at most `latency_target` of the teacher's."""
    if probe is None or probe.latency is None:
        raise ValueError("prune.budget latency_target predicts latency: it needs a probe with a table")
    table = probe.latency

    def narrower(i: int, keep: list[int], wanted: float, current: float, cost: Cost) -> int | None:
        below = [w for w in table.fast_widths(i) if w < keep[i]]
        for w in reversed(below):  # the widest cut that saves what is wanted, else the narrowest
            if current - cost(_with(keep, i, w)) >= wanted:
                return w
        return below[0] if below else None

    return _sensitivity_search(names, list(widths), params, probe, "latency", narrower)


Cost = Callable[[list[int]], float]
# a layer's next cut: (layer, widths, cost wanted saved, current cost, cost) -> its new width (None: none)
Narrower = Callable[[int, list[int], float, float, Cost], int | None]


def _with(keep: list[int], i: int, width: int) -> list[int]:
    return [*keep[:i], width, *keep[i + 1 :]]


def _sensitivity_search(
    names: list[str],
    keep: list[int],
    params: dict,
    probe: BudgetProbe | None,
    measure: str,
    narrower: Narrower,
) -> list[int]:
    """Method §3's greedy search, for a cost (`measure`: flops or latency): each round every layer
    proposes a cut worth about `sensitivity_step` of the teacher's cost, and the one losing the least
    validation accuracy per unit of cost saved is made, until `<measure>_target` of the cost is left."""
    if probe is None or probe.accuracy is None:
        raise ValueError(f"prune.budget {measure}_target measures validation accuracy: it needs a probe")
    cost: Cost = probe.flops if measure == "flops" else probe.latency.predict  # type: ignore[union-attr]
    target = params[f"{measure}_target"]
    full = cost(keep)
    goal, step = target * full, params["sensitivity_step"] * full
    current, accuracy = cost(keep), probe.accuracy(keep)
    while current > goal:
        wanted = min(step, current - goal)
        best: tuple[float, int, list[int], float, float] | None = None
        for i in range(len(keep)):
            width = narrower(i, keep, wanted, current, cost)
            if width is None:
                continue
            fewer = _with(keep, i, width)
            after = cost(fewer)
            if after >= current:
                continue
            acc = probe.accuracy(fewer)
            loss_per_cost = (accuracy - acc) / (current - after)
            if best is None or loss_per_cost < best[0]:
                best = (loss_per_cost, i, fewer, after, acc)
        if best is None:
            raise InputError(
                f"prune.{measure}_target {target}: every layer is at its minimum width at "
                f"{current / full:.3f} of the teacher's {measure}; set a target above that"
            )
        _, i, keep, current, accuracy = best
        probe.trace.append(
            {"layer": names[i], "keep": keep[i], f"{measure}_ratio": current / full, "val_acc": accuracy}
        )
    return keep


@register_budget("global", BudgetReads(flops_target=True))
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
