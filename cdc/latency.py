"""Latency that can be compared: models timed interleaved, in rotating order, on a fixed thread count.

Shared machines drift by tens of percent within seconds, so a model timed a minute after another is not
comparable to it. Here every round times each model once (a block of calls long enough to read the clock
well), in an order that rotates every round, so slow spells hit all models alike. Each model gets the
median over rounds; each ratio to the reference model is the median of per-round ratios, with the
interquartile range of those ratios as its spread.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

Forward = Callable[[], object]


@dataclass(frozen=True)
class Latency:
    """One model's median time per call and its ratio to the reference model."""

    ms: float
    speedup: float  # reference time / this model's time, median of per-round ratios
    speedup_p25: float
    speedup_p75: float

    @property
    def spread(self) -> float:
        """Half the interquartile range of the per-round speed-ups."""
        return (self.speedup_p75 - self.speedup_p25) / 2


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[int]:
    """Run the block with `n` intra-op threads (None: leave as is); yields the count in effect."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_block(forward: Forward, calls: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        forward()
    _sync(device)
    return (time.perf_counter() - start) * 1000.0 / calls


def compare_latency(
    forwards: dict[str, Forward],
    rounds: int = 30,
    block_ms: float = 20.0,
    warmup: int = 5,
    device: torch.device | None = None,
) -> dict[str, Latency]:
    """Interleaved latency of several forward callables; the first one is the speed-up reference.

    Each callable runs one inference (inputs bound in advance). A block repeats a call enough times to
    last about `block_ms` for the slowest model (measured after warm-up), the same count for every model,
    so each round costs about `len(forwards) * block_ms`. On CUDA the device is synchronized around each
    block, since kernel launches return before the GPU has finished.
    """
    if not forwards:
        raise ValueError("compare_latency needs at least one model")
    device = device or torch.device("cpu")
    names = list(forwards)
    with torch.no_grad():
        for fn in forwards.values():
            for _ in range(warmup):
                fn()
        slowest = max(_time_block(fn, 1, device) for fn in forwards.values())
        calls = max(1, int(block_ms / max(slowest, 1e-3)))
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                times[name].append(_time_block(forwards[name], calls, device))
    reference = np.asarray(times[names[0]])
    result = {}
    for name in names:
        ratios = reference / np.asarray(times[name])
        p25, p50, p75 = np.percentile(ratios, [25, 50, 75])
        result[name] = Latency(statistics.median(times[name]), float(p50), float(p25), float(p75))
    return result
