"""Prunable layers found, not declared: the channels of a CNN cdc has never seen, read off its graph.

Two views of one forward pass on an example input. Torch-Pruning's dependency graph gives each conv's
*pruning group*: every layer whose channels must go with its output channels (its BN, a depthwise conv
and the next conv's inputs, a squeeze-excitation's gate), and the operations the channels pass through.
A trace of module calls gives what the graph does not keep: the order of the convs, the BN and the
activation module that consume each conv's output (the tensor the statistics are collected on), and how
often a module runs per forward (torchvision's blocks reuse one ReLU for every activation).

A group is *prunable* when its channels are private to it. It is left whole, with the reason, when its
channels are shared through a residual addition or a concatenation (removing them would need one
combined score over every layer of the stream: not done), when it reaches a grouped conv that is not
depthwise (Torch-Pruning slices a grouped conv's inputs as if it had one group), or when its conv runs
more than once per forward. The stem (the conv reading the image) and the convs feeding a Linear layer
(the classifier input) are left whole unless a `layers_include` pattern names them.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.Hardswish,
    nn.GELU,
    nn.LeakyReLU,
    nn.ELU,
    nn.Mish,
    nn.Hardtanh,
    nn.PReLU,
    nn.SELU,
    nn.CELU,
)
# An activation called as a function (F.relu in a forward), found by its autograd node: the statistics
# apply it to the BN output they hook (each maps 0 to 0, so silencing a channel before it is the same)
FUNCTIONAL = {
    "ReluBackward0": "relu",
    "SiluBackward0": "silu",
    "HardswishBackward0": "hardswish",
    "GeluBackward0": "gelu",
    "EluBackward0": "elu",
    "LeakyReluBackward0": "leaky_relu",
}
# What the statistics see on each prunable layer (`Discovered.hooked`)
ACTIVATION, NORM_WITH_ACTIVATION, NORM_OUTPUT, CONV_OUTPUT = "activation", "norm+activation", "norm", "conv"
FUNCTION = "norm, then functional"  # + the function's name
PRUNABLE = "prunable"
# Reasons a group is left whole; STEM and CLASSIFIER_INPUT may be asked for by name (layers_include)
STEM, CLASSIFIER_INPUT = "stem", "classifier input"
RESIDUAL, CONCAT, GROUPED, REUSED = "residual", "concatenation", "grouped conv", "reused conv"
OPTIONAL = (STEM, CLASSIFIER_INPUT)
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass(frozen=True)
class Discovered:
    """One conv's output channels as the discovery sees them.

    `status` is PRUNABLE or why the group is left whole; `followers` lose the same channels (a depthwise
    conv, a squeeze-excitation's expanding conv); `tensor` is the module whose output is scored, at its
    `call`-th run of `calls` per forward, `hooked` says which tensor that is; `block` is the outermost
    module with a forward of its own (a residual block, an inverted residual) that holds the conv.
    """

    name: str
    width: int
    status: str
    detail: str
    followers: tuple[str, ...]
    norm: str | None
    tensor: str
    call: int
    calls: int
    hooked: str
    block: str
    function: str | None = None  # a functional activation applied to the hooked tensor (FUNCTIONAL)

    @property
    def eligible(self) -> bool:
        return self.status == PRUNABLE or self.status in OPTIONAL


@dataclass
class _Call:
    path: str
    module: nn.Module
    inputs: tuple[int, ...]
    output: int | None = None
    grad_fn: object = None  # the autograd node that made the output


def _trace(model: nn.Module, example: torch.Tensor) -> tuple[list[_Call], dict[int, list[str]]]:
    """Every module call of one forward, in the order calls start, with the ids of the tensors they
    read and return (the tensors are kept alive until the end, so no id is reused); and for each
    autograd node (by id), the names of the nodes that consume its result."""
    calls: list[_Call] = []
    keep: list[torch.Tensor] = []
    open_calls: dict[int, list[_Call]] = {}
    handles = []

    def pre(path: str):  # noqa: ANN202 - hook factory
        def hook(module: nn.Module, args: tuple) -> None:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            keep.extend(tensors)
            call = _Call(path, module, tuple(id(t) for t in tensors))
            calls.append(call)
            open_calls.setdefault(id(module), []).append(call)

        return hook

    def post(module: nn.Module, _args: tuple, out: object) -> None:
        call = open_calls[id(module)].pop()
        if isinstance(out, torch.Tensor):
            keep.append(out)
            call.output, call.grad_fn = id(out), out.grad_fn

    for path, module in model.named_modules():
        if path:
            handles.append(module.register_forward_pre_hook(pre(path)))
            handles.append(module.register_forward_hook(post))
    try:
        with torch.enable_grad():
            out = model(example)
    finally:
        for h in handles:
            h.remove()
    consumers: dict[int, list[str]] = {}
    seen, todo = set(), [out.grad_fn] if isinstance(out, torch.Tensor) else []
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for child, _ in node.next_functions:
            if child is not None:
                consumers.setdefault(id(child), []).append(type(node).__name__)
                todo.append(child)
    return calls, consumers


def _consumer(calls: list[_Call], after: int, tensor: int | None) -> tuple[int, _Call] | None:
    """The first call after index `after` that reads `tensor`."""
    if tensor is None:
        return None
    for i in range(after + 1, len(calls)):
        if tensor in calls[i].inputs:
            return i, calls[i]
    return None


def _block_of(model: nn.Module, path: str) -> str:
    """The outermost proper ancestor of `path` whose class has a forward of its own (not a container),
    or the layer itself: ResNet's `layer1.0`, MobileNet's `features.3`, a VGG conv alone."""
    parts = path.split(".")
    for depth in range(1, len(parts)):
        ancestor = ".".join(parts[:depth])
        if not isinstance(model.get_submodule(ancestor), CONTAINERS):
            return ancestor
    return path


def _is_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


Plan = list[tuple[str, Callable]]  # (module path, Torch-Pruning handler) of every layer a group touches


def _group_reason(
    graph: tp.DependencyGraph, conv: nn.Conv2d, names: dict[nn.Module, str]
) -> tuple[str, str, list[str], Plan | None]:
    """(status, detail, follower convs, surgery plan) of the pruning group of `conv`'s output channels.
    The plan applies the group's handlers to the same channel indices in every layer, so it exists only
    where the group maps indices one to one (not through a flatten into a Linear)."""
    group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=[0])
    one_to_one = all(list(idxs) == [0] for _, idxs in group)
    plan = [(names[d.target.module], d.handler) for d, _ in group if d.target.module in names]
    followers, linears, adds, concats, grouped = [], [], 0, 0, []
    for dep, _ in group:
        module, handler = dep.target.module, getattr(dep.handler, "__name__", "")
        if isinstance(module, nn.Conv2d) and module is not conv:
            if module.groups > 1 and not _is_depthwise(module):
                grouped.append(names[module])
            elif handler == "prune_out_channels":
                followers.append(names[module])
        elif isinstance(module, nn.Linear) and handler == "prune_in_channels":
            linears.append(names[module])
        elif isinstance(module, tp.ops._ElementWiseOp):
            fn = str(getattr(module, "_grad_fn", ""))
            adds += "AddBackward" in fn or "SubBackward" in fn
        elif isinstance(module, tp.ops._ConcatOp | tp.ops._SplitOp):
            concats += 1
    plan_if = plan if one_to_one else None
    if conv.groups > 1 and not _is_depthwise(conv):
        return GROUPED, f"groups={conv.groups}", [], None
    if grouped:
        return GROUPED, f"feeds {grouped[0]}", [], None
    if adds:
        return RESIDUAL, f"an addition shares its channels with {len(followers)} other conv(s)", [], None
    if concats:
        return CONCAT, "channels concatenated with other layers'", [], None
    if linears:
        return CLASSIFIER_INPUT, f"feeds {linears[0]}", followers, plan_if
    return PRUNABLE, "", followers, plan_if


def discover(
    model: nn.Module,
    example: torch.Tensor,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    plans: dict[str, Plan] | None = None,
) -> list[Discovered]:
    """Every conv of `model` in forward order, each with its status; `include`/`exclude` are module-name
    patterns (fnmatch) that narrow the prunable ones or name a stem/classifier input to prune anyway.
    `plans` receives each eligible group's surgery plan (where it maps channels one to one): a copy of
    the model is narrowed with it without tracing the graph again."""
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():  # Torch-Pruning traces through autograd (params validate under no_grad)
            calls, consumers = _trace(model, example)
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    finally:
        model.train(was_training)
    names = {m: n for n, m in model.named_modules()}
    runs: dict[int, list[int]] = {}
    for i, c in enumerate(calls):
        runs.setdefault(id(c.module), []).append(i)
    input_id = calls[0].inputs[0] if calls and calls[0].inputs else None
    claimed: set[str] = set()
    found: list[Discovered] = []
    for i, call in enumerate(calls):
        if not isinstance(call.module, nn.Conv2d) or call.path in claimed:
            continue
        conv = call.module
        claimed.add(call.path)
        if len(runs[id(conv)]) > 1:
            runs_per_forward = f"runs {len(runs[id(conv)])} times per forward"
            status, detail, followers, plan = REUSED, runs_per_forward, [], None
        else:
            status, detail, followers, plan = _group_reason(graph, conv, names)
            if status == PRUNABLE and input_id in call.inputs:
                status, detail = STEM, "reads the input image"
        if plans is not None and plan is not None:
            plans[call.path] = plan
        claimed.update(followers)
        norm, hooked, tensor_call, function = None, CONV_OUTPUT, (i, call), None
        nxt = _consumer(calls, i, call.output)
        if nxt and isinstance(nxt[1].module, nn.modules.batchnorm._BatchNorm):
            norm, tensor_call = nxt[1].path, nxt
            inner_act = any(isinstance(m, ACTIVATIONS) for m in nxt[1].module.modules())
            hooked = NORM_WITH_ACTIVATION if inner_act else NORM_OUTPUT
            if not inner_act:
                act = _consumer(calls, nxt[0], nxt[1].output)
                after = consumers.get(id(nxt[1].grad_fn), [])
                if act and isinstance(act[1].module, ACTIVATIONS):
                    tensor_call, hooked = act, ACTIVATION
                elif len(after) == 1 and after[0] in FUNCTIONAL:
                    function = FUNCTIONAL[after[0]]
                    hooked = f"{FUNCTION} {function}"
        elif nxt and isinstance(nxt[1].module, ACTIVATIONS):
            tensor_call, hooked = nxt, ACTIVATION
        t_index, t_call = tensor_call
        module_runs = runs[id(t_call.module)]
        found.append(
            Discovered(
                name=call.path,
                width=conv.out_channels,
                status=status,
                detail=detail,
                followers=tuple(followers),
                norm=norm,
                tensor=t_call.path,
                call=module_runs.index(t_index),
                calls=len(module_runs),
                hooked=hooked,
                block=_block_of(model, call.path),
                function=function,
            )
        )
    return [_selected(d, include, exclude) for d in found]


def _selected(d: Discovered, include: list[str] | None, exclude: list[str] | None) -> Discovered:
    """Apply the include/exclude patterns: the status of a layer they leave out says so."""

    def matches(patterns: list[str] | None) -> str | None:
        return next((p for p in patterns or [] if fnmatch.fnmatchcase(d.name, p)), None)

    if not d.eligible:
        return d
    status, detail = d.status, d.detail
    hit = matches(include)
    if include is not None:
        status, detail = (PRUNABLE, f"{d.status}, included by {hit!r}") if hit else ("not included", detail)
    elif d.status != PRUNABLE:
        return d
    excluded = matches(exclude)
    if excluded and status == PRUNABLE:
        status, detail = "excluded", f"by {excluded!r}"
    return Discovered(**{**d.__dict__, "status": status, "detail": detail})


def describe(found: list[Discovered]) -> str:
    """The discovered layers as a table: what `cdc inspect` prints and the prune report records."""
    rows = [("layer", "width", "status", "scored tensor", "block", "goes with")]
    for d in found:
        status = d.status if not d.detail else f"{d.status} ({d.detail})"
        run = f" [run {d.call + 1} of {d.calls}]" if d.calls > 1 else ""
        rows.append(
            (d.name, str(d.width), status, f"{d.tensor} ({d.hooked}){run}", d.block, ", ".join(d.followers))
        )
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    pruned = sum(d.status == PRUNABLE for d in found)
    convs = len(found) + sum(len(d.followers) for d in found)
    return "\n".join([*lines, f"{pruned} prunable of {len(found)} channel groups ({convs} convs)"])
