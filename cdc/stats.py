"""Per-layer, per-channel, per-class sufficient statistics of the scored activations (method §1).

For layer l, channel c, class k: n_k (images), D_l = H*W (pixels per image), s1 = sum x, s2 = sum x^2.
Memory is O(layers x classes x channels), independent of the dataset size.

Precision: each image's sums over its pixels are taken in the activations' float32 (relative error about
1e-7, the same order as the float32 forward pass that produced the values) and everything after that,
across images and classes, in float64, so the error does not grow with the number of images. Summing
every pixel in float64 would cost the statistics pass about 60% over plain inference on a CPU; this
costs a few percent (bench/stats_overhead.py).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cdc import distributed
from cdc.models import PrunableNet, hook_layer

SCORED_TENSORS = ("post_relu", "pre_relu")
BN_MODES = ("eval", "batch")


@dataclass
class LayerStats:
    """Sufficient statistics of one layer: arrays are (classes x channels) except `n` (classes)."""

    n: np.ndarray  # int64, images per class
    pixels: int  # D = H*W
    s1: np.ndarray  # float64
    s2: np.ndarray  # float64

    def grouped(self, fine_to_group: np.ndarray, n_groups: int) -> LayerStats:
        """Statistics over label groups (coarse classes): sums of the fine sums."""
        onehot = np.zeros((n_groups, len(fine_to_group)))
        onehot[fine_to_group, np.arange(len(fine_to_group))] = 1.0
        return LayerStats((onehot @ self.n).astype(np.int64), self.pixels, onehot @ self.s1, onehot @ self.s2)

    def moments(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """One-vs-rest statistics of the classes seen: (n_P, mu_P, var_P, mu_Q, var_Q).

        `n_P` is images per class (classes x 1); the rest are classes x channels. Variances have no
        Bessel correction; the rest Q is totals minus the class. Classes without images are dropped.
        """
        seen = self.n > 0
        n_p = self.n[seen].astype(np.float64)[:, None]
        s1, s2 = self.s1[seen], self.s2[seen]
        count_p = n_p * self.pixels
        count_q = count_p.sum() - count_p
        s1_q, s2_q = s1.sum(0) - s1, s2.sum(0) - s2
        mu_p, mu_q = s1 / count_p, s1_q / count_q
        var_p = np.maximum(s2 / count_p - mu_p**2, 0.0)
        var_q = np.maximum(s2_q / count_q - mu_q**2, 0.0)
        return n_p, mu_p, var_p, mu_q, var_q


@dataclass
class GridStats:
    """Statistics of one layer's channels as vectors over a pooled spatial grid (for `di`, method §2).

    Each channel's map is average-pooled to a small grid of G cells; per class the image count and the
    sum of the G-vectors, and over all images each channel's G x G sum of outer products.
    """

    n: np.ndarray  # int64 (classes,)
    s1: np.ndarray  # float64 (classes, channels, G)
    outer: np.ndarray  # float64 (channels, G, G), over all images

    def grouped(self, fine_to_group: np.ndarray, n_groups: int) -> GridStats:
        onehot = np.zeros((n_groups, len(fine_to_group)))
        onehot[fine_to_group, np.arange(len(fine_to_group))] = 1.0
        s1 = np.einsum("gk,kcd->gcd", onehot, self.s1)
        return GridStats((onehot @ self.n).astype(np.int64), s1, self.outer)


@dataclass
class _DeviceSums:
    """Running sums of one layer on the activations' device (float64), copied to the host once."""

    n: torch.Tensor
    pixels: int
    s1: torch.Tensor
    s2: torch.Tensor

    def to_host(self) -> LayerStats:
        return LayerStats(self.n.cpu().numpy(), self.pixels, self.s1.cpu().numpy(), self.s2.cpu().numpy())


@dataclass
class _DeviceGridSums:
    n: torch.Tensor
    s1: torch.Tensor  # classes x (channels * G)
    outer: torch.Tensor  # channels x G x G

    def to_host(self) -> GridStats:
        c = self.outer.shape[0]
        s1 = self.s1.cpu().numpy().reshape(self.s1.shape[0], c, -1)
        return GridStats(self.n.cpu().numpy(), s1, self.outer.cpu().numpy())


class StatsCollector:
    """Forward hooks on every prunable layer's activation that accumulate per-class sums.

    Use as a context manager around forward passes; set `labels` (on the model's device) before each
    batch. The sums stay on that device until `stats()` copies them to the host. With `grid` set, the
    maps are also average-pooled to grid x grid cells (at most the map's size) for `grid_stats()`.
    """

    def __init__(
        self, model: PrunableNet, num_classes: int, grid: int | None = None, tensor: str = "post_relu"
    ) -> None:
        if tensor not in SCORED_TENSORS:
            raise ValueError(f"unknown scored tensor {tensor!r}; known: {', '.join(SCORED_TENSORS)}")
        self.model, self.num_classes, self.grid, self.tensor = model, num_classes, grid, tensor
        self._grid_sums: dict[str, _DeviceGridSums] = {}
        self._labels: torch.Tensor | None = None
        self._onehot_t: torch.Tensor | None = None  # classes x batch, float64
        self._counts: torch.Tensor | None = None
        self._sums: dict[str, _DeviceSums] = {}
        self._handles: list = []

    @property
    def labels(self) -> torch.Tensor | None:
        return self._labels

    @labels.setter
    def labels(self, labels: torch.Tensor) -> None:
        """Class labels of the next batch; the per-class reduction matrix is built once per batch."""
        self._labels = labels
        onehot = torch.nn.functional.one_hot(labels, self.num_classes)
        self._onehot_t = onehot.T.to(torch.float64)
        self._counts = onehot.sum(0)

    def _hook(self, name: str) -> Callable[[torch.Tensor], None]:
        def hook(out: torch.Tensor) -> None:
            assert self._onehot_t is not None, "set collector.labels before the forward pass"
            x = out.detach()
            st = self._sums.get(name)
            if st is None:
                zeros = torch.zeros(self.num_classes, x.shape[1], dtype=torch.float64, device=x.device)
                counts = torch.zeros(self.num_classes, dtype=torch.int64, device=x.device)
                st = _DeviceSums(counts, x.shape[2] * x.shape[3], zeros, zeros.clone())
                self._sums[name] = st
            # Per-image sums over pixels in float32 (two light reductions, no float64 copy of the map),
            # then per class in float64. The reductions run over a 2-D (image x channel, pixel) view:
            # vector_norm over dims (2, 3) of a 4-D map takes a path ten times slower on real maps.
            flat = x.reshape(x.shape[0] * x.shape[1], -1)
            s1 = flat.sum(1, dtype=torch.float32).double().view(x.shape[0], x.shape[1])
            s2 = torch.linalg.vector_norm(flat, dim=1).double().square().view(x.shape[0], x.shape[1])
            st.n += self._counts
            st.s1 += self._onehot_t @ s1
            st.s2 += self._onehot_t @ s2
            if self.grid:
                self._accumulate_grid(name, x)

        return hook

    def _accumulate_grid(self, name: str, x: torch.Tensor) -> None:
        cells = (min(self.grid, x.shape[2]), min(self.grid, x.shape[3]))
        pooled = nn.functional.adaptive_avg_pool2d(x, cells).flatten(2).double()  # B x C x G
        gs = self._grid_sums.get(name)
        if gs is None:
            b, c, g = pooled.shape
            gs = _DeviceGridSums(
                torch.zeros(self.num_classes, dtype=torch.int64, device=x.device),
                torch.zeros(self.num_classes, c * g, dtype=torch.float64, device=x.device),
                torch.zeros(c, g, g, dtype=torch.float64, device=x.device),
            )
            self._grid_sums[name] = gs
        gs.n += self._counts
        gs.s1 += self._onehot_t @ pooled.flatten(1)
        gs.outer += torch.einsum("bcg,bch->cgh", pooled, pooled)

    def all_reduce(self) -> None:
        """Sum every rank's sums (each streamed its share of the images); nothing in one process."""
        for st in self._sums.values():
            distributed.all_reduce_sum(st.n, st.s1, st.s2)
        for gs in self._grid_sums.values():
            distributed.all_reduce_sum(gs.n, gs.s1, gs.outer)

    def stats(self) -> dict[str, LayerStats]:
        """The statistics so far, keyed by prunable layer name in forward order, on the host."""
        return {name: sums.to_host() for name, sums in self._sums.items()}

    def grid_stats(self) -> dict[str, GridStats]:
        """The pooled-grid statistics so far (empty unless `grid` was set), in forward order."""
        return {name: sums.to_host() for name, sums in self._grid_sums.items()}

    def __enter__(self) -> StatsCollector:
        for layer in self.model.prunable_layers():
            before = self.tensor != "post_relu"
            self._handles.append(hook_layer(self.model, layer, self._hook(layer.name), before))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def collect_stats(
    model: PrunableNet, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_classes: int
) -> dict[str, LayerStats]:
    """One eval-mode pass; returns statistics keyed by prunable layer name, in forward order.

    Batches must be on the model's device; the float64 sums are accumulated there.
    """
    return collect_all_stats(model, batches, num_classes)[0]


def collect_all_stats(
    model: PrunableNet,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    grid: int | None = None,
    tensor: str = "post_relu",
    bn_mode: str = "eval",
) -> tuple[dict[str, LayerStats], dict[str, GridStats]]:
    """One pass collecting the scalar statistics and, with `grid`, the pooled-grid ones.

    `tensor`: the post-BN-ReLU activation (method §1) or the BN output before the ReLU. `bn_mode`:
    BN with its running statistics (`eval`, method §1 [ours]) or each batch's own statistics (`batch`,
    what the released TensorFlow code did); in batch mode a copy of the model runs, the model is untouched.
    """
    if bn_mode not in BN_MODES:
        raise ValueError(f"unknown BN mode {bn_mode!r}; known: {', '.join(BN_MODES)}")
    if bn_mode == "batch":
        model = copy.deepcopy(model).train()
    else:
        model.eval()
    with StatsCollector(model, num_classes, grid, tensor) as collector, torch.no_grad():
        for x, y in batches:
            collector.labels = y
            model(x)
        collector.all_reduce()
    return collector.stats(), collector.grid_stats()


def confusion_matrix(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_classes: int
) -> np.ndarray:
    """Counts[true, predicted] of an eval-mode pass, counted on the batches' device."""
    model.eval()
    device = next(model.parameters()).device
    counts = torch.zeros(num_classes**2, dtype=torch.int64, device=device)
    with torch.no_grad():
        for x, y in batches:
            pred = model(x).argmax(1)
            counts += torch.bincount(y * num_classes + pred, minlength=num_classes**2)
    distributed.all_reduce_sum(counts)  # each process counted its share
    return counts.cpu().numpy().reshape(num_classes, num_classes)
