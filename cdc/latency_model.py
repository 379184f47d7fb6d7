"""A latency model of the deployment target: how long a model of given widths takes, predicted from a
table of measurements instead of FLOPs.

FLOPs do not predict time: a 16->8 conv on a 28x28 map costs what a 16->16 one does, while the wide late
layers give their time back. The table holds, for the target (device, thread count, batch size, inference
form), the full model's time and, per prunable layer and kept width (steps of `round_to`), the model's
time with that layer alone at that width. Narrowing layer i changes its own conv and the convs that read
it (the next conv's input channels, a depthwise conv's groups): those operators are timed on their own at
each width, interleaved (`cdc.latency.compare_latency`), as NetAdapt and HALP do, so a layer's change is
measured as the whole signal rather than as a few percent of a network's noisy time. A pruned model's
prediction is the full model's time plus each layer's change at its kept width (linear between measured
widths): additive, which bench/latency_table.py checks against whole-model timings of other widths.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cdc.inference import inference_forward
from cdc.io import write_json
from cdc.latency import compare_latency, threads

log = logging.getLogger(__name__)
Builder = Callable[[list[int]], nn.Module]  # widths -> a model of those widths (weights do not matter)


@dataclass
class LatencyTable:
    """Measured latency of one architecture on one target, per prunable layer and kept width."""

    arch: str
    device: str
    threads: int
    batch: int
    form: str
    input_shape: list[int]
    full_ms: float
    layers: list[str]
    widths: list[int]  # full widths
    steps: list[list[int]]  # kept widths measured per layer (ascending, the full width last)
    ms: list[list[float]]  # the whole model's time with only that layer at that width
    machine: str = ""  # the CPU's model or the GPU's name
    additivity: float = 1.0  # the factor the per-layer changes were scaled by (`_additivity`)

    def layer_ms(self, i: int, width: int) -> float:
        """The whole model's time with layer i alone at `width` (linear between measured widths)."""
        return float(np.interp(width, self.steps[i], self.ms[i]))

    def predict(self, widths: Sequence[int]) -> float:
        """Predicted time of the model with these widths (ms per batch)."""
        if len(widths) != len(self.widths):
            raise ValueError(f"{len(widths)} widths for a table of {len(self.widths)} prunable layers")
        return self.full_ms + sum(self.layer_ms(i, w) - self.full_ms for i, w in enumerate(widths))

    def fast_widths(self, i: int) -> list[int]:
        """The measured widths of layer i worth pruning to: each faster than every wider one. A kernel
        that steps (a 24-channel conv as slow as a 32-channel one) makes the narrower width a loss of
        accuracy for no time, so a budget keeps the wider one."""
        fast, best = [], float("inf")
        for w, t in sorted(zip(self.steps[i], self.ms[i], strict=True), reverse=True):
            if t < best:
                fast.append(w)
                best = t
        return sorted(fast)

    def key(self) -> dict:
        """What a table is valid for: the same architecture measured on the same target."""
        keys = ("arch", "device", "machine", "threads", "batch", "form", "input_shape")
        return {k: getattr(self, k) for k in keys}

    def save(self, path: Path) -> None:
        write_json(path, {"measured": True, **asdict(self)})

    @classmethod
    def load(cls, path: Path) -> LatencyTable | None:
        """The table at `path`, or None where the stage measured none (`save_unmeasured`)."""
        return cls.load_record(json.loads(Path(path).read_text()))

    @classmethod
    def load_record(cls, record: dict) -> LatencyTable | None:
        """A table from its saved JSON object (None: a stub saying why none was measured)."""
        record = dict(record)
        if not record.pop("measured", True):
            return None
        return cls(**record)


def save_unmeasured(path: Path, reason: str) -> None:
    """What the latency_table stage writes when no budget reads a table: why none was measured."""
    write_json(path, {"measured": False, "reason": reason})


def width_steps(width: int, step: int) -> list[int]:
    """The kept widths a layer is measured at: multiples of `step` below `width`, then `width`."""
    return sorted({*range(step, width, step), width})


def _forward(build: Builder, widths: list[int], x: torch.Tensor, form: str, n_threads: int | None):
    model = build(widths).to(x.device).eval()
    return inference_forward(model, form, x, n_threads)


# forms whose operators run one by one as PyTorch modules: a layer's time is timed on its own operators.
# A compiler or another runtime fuses across them, so there the whole network is timed with the layer
# narrowed instead (much noisier: a layer is a few percent of the network).
OPERATOR_FORMS = ("eager", "folded", "folded_channels_last")


@dataclass(frozen=True)
class ConvShape:
    """What a conv costs: its hyper-parameters and the size of the map it reads (per image)."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int
    height: int
    width: int


def conv_shapes(model: nn.Module, image_shape: Sequence[int]) -> dict[str, ConvShape]:
    """Every Conv2d of `model` (by module name) with the map it reads, from one forward of one image."""
    found: dict[str, ConvShape] = {}

    def hook(name: str, conv: nn.Conv2d) -> Callable:
        def record(_module: nn.Module, args: tuple) -> None:
            h, w = args[0].shape[-2:]
            padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
            found[name] = ConvShape(
                conv.in_channels, conv.out_channels, tuple(conv.kernel_size), tuple(conv.stride),
                padding, tuple(conv.dilation), conv.groups, int(h), int(w),
            )  # fmt: skip

        return record

    handles = [
        m.register_forward_pre_hook(hook(n, m)) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)
    ]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *image_shape))
    finally:
        for h in handles:
            h.remove()
    return found


class ConvOperators(nn.Module):
    """Some convs of a network, each (bias as after BN folding, then ReLU) on a random map of its input
    size: the operators one prunable layer's width changes, timed without the rest of the network."""

    def __init__(
        self, shapes: list[ConvShape], batch: int, channels_last: bool, device: torch.device
    ) -> None:
        super().__init__()
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.convs = nn.ModuleList(
            nn.Conv2d(s.in_channels, s.out_channels, s.kernel_size, s.stride, s.padding, s.dilation, s.groups)
            for s in shapes
        ).to(device, memory_format=fmt)
        self.maps = [
            torch.rand(batch, s.in_channels, s.height, s.width, device=device).contiguous(memory_format=fmt)
            for s in shapes
        ]

    def forward(self) -> None:
        for conv, x in zip(self.convs, self.maps, strict=True):
            torch.relu_(conv(x))


def measure_table(
    build: Builder,
    arch: str,
    layers: list[str],
    widths: list[int],
    input_shape: list[int],
    batch: int,
    step: int,
    form: str = "folded",
    device: torch.device | None = None,
    n_threads: int | None = None,
    rounds: int = 10,
    progress: Callable[[str], None] = lambda message: None,
) -> LatencyTable:
    """The full model's time and, per layer and `width_steps` width, the model's time with that layer
    alone at that width. In an OPERATOR_FORMS form, a layer's change is the change of the convs its width
    changes (its own, the next conv's input, a depthwise conv's groups), timed alone at each width;
    otherwise the whole model's with that layer narrowed. Either way the full model runs in the same
    interleaved rounds, and a change is kept as a fraction of its time there."""
    device = device or torch.device("cpu")
    x = torch.rand(batch, *input_shape, device=device)
    with threads(n_threads) as in_effect, torch.no_grad():
        model = _forward(build, widths, x, form, n_threads)
        full_shapes = conv_shapes(build(widths), input_shape) if form in OPERATOR_FORMS else {}
        steps, fractions, model_ms = [], [], []
        for i, name in enumerate(layers):
            kept = width_steps(widths[i], step)
            variants = {w: [*widths[:i], w, *widths[i + 1 :]] for w in reversed(kept)}  # full width first
            if full_shapes:
                forwards = _operators(build, variants, full_shapes, input_shape, batch, form, device)
            else:
                forwards = {w: _forward(build, v, x, form, n_threads) for w, v in variants.items()}
            # the full model is timed in the same rounds, so each change is a fraction of the model's time
            # measured in the same seconds: this machine's speed drifts by tens of percent within a minute
            timed = compare_latency({"model": model, **forwards}, rounds=rounds, device=device)
            at_full = 1 / timed[widths[i]].speedup
            fractions.append([1 / timed[w].speedup - at_full for w in kept])
            model_ms.append(timed["model"].ms)
            steps.append(kept)
            progress(f"{name}: {len(kept)} widths")
        full_ms = float(np.median(model_ms))
        scale = _additivity(build, widths, steps, fractions, model, x, form, n_threads, rounds, device)
        rows = [[full_ms * (1 + scale * f) for f in row] for row in fractions]
    return LatencyTable(
        arch, str(device), in_effect, batch, form, list(input_shape), full_ms, layers, list(widths),
        steps, rows, additivity=scale,
    )  # fmt: skip


def _additivity(
    build: Builder,
    widths: list[int],
    steps: list[list[int]],
    fractions: list[list[float]],
    model: Callable[[], object],
    x: torch.Tensor,
    form: str,
    n_threads: int | None,
    rounds: int,
    device: torch.device,
) -> float:
    """How much more the network saves with every layer narrowed than the sum of each alone: the
    network at every layer's narrowest and at its middle measured width, timed whole in the same
    rounds as the full one, against the summed changes (least squares through the origin). Smaller maps
    leave the caches to the rest of the network, so cuts compound (1.5-2x at batch 64 on a 2-core CPU,
    bench/latency_table.py); the table's changes are scaled by it."""
    vectors = {"narrowest": [s[0] for s in steps], "middle": [s[(len(s) - 1) // 2] for s in steps]}
    forwards = {"model": model} | {k: _forward(build, v, x, form, n_threads) for k, v in vectors.items()}
    timed = compare_latency(forwards, rounds=2 * rounds, device=device)
    summed = [
        sum(float(np.interp(k, s, f)) for k, s, f in zip(v, steps, fractions, strict=True))
        for v in vectors.values()
    ]
    measured = [1 / timed[k].speedup - 1 for k in vectors]
    return fit_additivity(summed, measured)


# what the additivity factor was measured at (bench/latency_table.py: 0.87-0.99 at batch 1, 1.08-1.36 at
# batch 64 on a 2-core CPU); outside this range the fit says more about the machine's noise than the model
ADDITIVITY_RANGE = (0.5, 2.0)


def fit_additivity(summed: Sequence[float], measured: Sequence[float]) -> float:
    """The factor that scales the summed per-layer changes (fractions of the full model's time) to the
    whole networks' measured changes: least squares through the origin. A fit outside ADDITIVITY_RANGE
    (near zero or negative: the narrowed networks timed no faster than the full one, as when another
    process takes the cores during the rounds) is noise, not a property of the network: the table then
    keeps the operators' own sum (1.0), which was timed as the whole signal, and says so."""
    denominator = sum(a * a for a in summed)
    if denominator < 1e-6:  # nothing measurable to scale (a model too small to narrow)
        return 1.0
    scale = sum(a * b for a, b in zip(summed, measured, strict=True)) / denominator
    low, high = ADDITIVITY_RANGE
    if not low <= scale <= high:
        log.warning(
            "latency table: the whole networks' timings fit an additivity of %.3g, outside [%g, %g] "
            "(too noisy: was the machine busy?); keeping the per-layer changes as measured (1.0)",
            scale, low, high,
        )  # fmt: skip
        return 1.0
    return scale


def _operators(
    build: Builder,
    variants: dict[int, list[int]],
    full_shapes: dict[str, ConvShape],
    input_shape: list[int],
    batch: int,
    form: str,
    device: torch.device,
) -> dict[int, ConvOperators]:
    """Per width, the convs the layer's width changes (from the full model's), at that width."""
    shapes = {w: conv_shapes(build(v), input_shape) for w, v in variants.items()}
    changed = sorted({n for s in shapes.values() for n in s if s[n] != full_shapes[n]})
    channels_last = form == "folded_channels_last"
    return {
        w: ConvOperators([s[n] for n in changed], batch, channels_last, device) for w, s in shapes.items()
    }


def measure_models(
    build: Builder,
    width_vectors: dict[str, list[int]],
    input_shape: list[int],
    batch: int,
    form: str = "folded",
    device: torch.device | None = None,
    n_threads: int | None = None,
    rounds: int = 20,
) -> dict[str, float]:
    """Whole-model times (ms) of several width vectors, interleaved: what a prediction is checked against.
    The first vector is the reference; each time is its median over rounds."""
    device = device or torch.device("cpu")
    x = torch.rand(batch, *input_shape, device=device)
    with threads(n_threads), torch.no_grad():
        forwards = {name: _forward(build, w, x, form, n_threads) for name, w in width_vectors.items()}
        timed = compare_latency(forwards, rounds=rounds, device=device)
    reference = timed[next(iter(width_vectors))].ms
    return {name: reference / t.speedup for name, t in timed.items()}
