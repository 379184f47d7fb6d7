"""A latency model of the deployment target: how long a model of given widths takes, predicted from a
table of measurements instead of FLOPs.

FLOPs do not predict time: a 16->8 conv on a 28x28 map costs what a 16->16 one does, while the wide late
layers give their time back. The table measures, on the target (device, thread count, batch size,
inference form), the whole network with one prunable layer narrowed at a time, in steps of `round_to`,
interleaved with the full network (`cdc.latency.compare_latency`), so each entry is a ratio to the full
model measured under the same conditions. Narrowing layer i changes its own conv and the next layer's
input channels, so its entry holds both. A pruned model's prediction is the full model's time plus each
layer's change at its kept width (linear between measured widths): additive, which `check` measures
against whole-model timings of other width vectors (bench/latency_table.py reports that error).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cdc.inference import inference_forward
from cdc.io import write_json
from cdc.latency import compare_latency, threads

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
        record = json.loads(Path(path).read_text())
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
    """Time the full model and, one layer at a time, the model with that layer at each `width_steps`
    width: one interleaved measurement per layer, the full model as its reference."""
    device = device or torch.device("cpu")
    x = torch.rand(batch, *input_shape, device=device)
    steps, ms, full_times = [], [], []
    with threads(n_threads) as in_effect, torch.no_grad():
        for i, name in enumerate(layers):
            kept = width_steps(widths[i], step)
            forwards = {"full": _forward(build, widths, x, form, n_threads)}
            for w in kept[:-1]:
                forwards[str(w)] = _forward(build, [*widths[:i], w, *widths[i + 1 :]], x, form, n_threads)
            timed = compare_latency(forwards, rounds=rounds, device=device)
            full = timed["full"].ms
            full_times.append(full)
            # each width relative to the full model of the same rounds: drift between layers cancels
            steps.append(kept)
            ms.append([full / timed[str(w)].speedup for w in kept[:-1]] + [full])
            progress(f"{name}: {len(kept)} widths")
    full_ms = float(np.median(full_times))
    scale = [full_ms / f for f in full_times]  # every layer's row on the common full-model time
    rows = [[float(t * s) for t in row] for row, s in zip(ms, scale, strict=True)]
    return LatencyTable(
        arch,
        str(device),
        in_effect,
        batch,
        form,
        list(input_shape),
        full_ms,
        layers,
        list(widths),
        steps,
        rows,
    )


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
