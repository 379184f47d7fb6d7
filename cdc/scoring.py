"""Hierarchical channel scoring: coarse labels for the first T blocks, fine labels after (method §3).

T counts blocks, not layers: every prunable layer of a block (a bottleneck's conv1 and conv2) gets the
same labels, as in the released code. T is a count (blocks 1..T are coarse); the released code's `T` is
a 0-based index (blocks 0..T are coarse), one less: its T = 14 on ResNet-56 is 15 here."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np

from cdc.criteria import GRID_DISCRIMINANTS
from cdc.discriminants import DISCRIMINANTS
from cdc.errors import InputError
from cdc.stats import GridStats, LayerStats


@dataclass
class LayerScores:
    layer: str
    level: str  # "coarse" or "fine" (class discriminants), "none" (criteria without labels)
    scores: np.ndarray  # one per channel


def score_layers(
    stats: dict[str, LayerStats] | dict[str, GridStats],
    discriminant: str,
    fine_to_coarse: np.ndarray,
    coarse_blocks: int,
    seed: int,
    eps: float | None = None,
    block_of: dict[str, str] | None = None,
) -> list[LayerScores]:
    """Score every channel of every layer (layers in forward order).

    `stats` are the scalar statistics, or the pooled-grid ones for a grid discriminant (`di`). The
    layers of the first `coarse_blocks` blocks are scored against the coarse classes, the rest against
    the fine ones (0: fine everywhere); `block_of` names each layer's block (default: a block per
    layer). `eps` replaces the discriminant's default ridge (`rho` for `di`); `random` has none.
    """
    fn = (
        GRID_DISCRIMINANTS[discriminant]
        if discriminant in GRID_DISCRIMINANTS
        else DISCRIMINANTS.get(discriminant)
    )
    if eps is not None and discriminant != "random":
        fn = partial(fn, **{"rho" if discriminant in GRID_DISCRIMINANTS else "eps": eps})
    n_groups = int(fine_to_coarse.max()) + 1
    block_index = block_indices(list(stats), block_of)
    out = []
    for i, (name, st) in enumerate(stats.items()):
        coarse = block_index[name] < coarse_blocks
        labelled = st.grouped(fine_to_coarse, n_groups) if coarse else st
        if (labelled.n > 0).sum() < 2:
            raise InputError(f"layer {name}: images of fewer than two classes (a discriminant needs two)")
        rng = np.random.default_rng([seed, i])
        scores = np.asarray(fn(labelled, rng), np.float64)
        if not np.isfinite(scores).all():
            bad = np.flatnonzero(~np.isfinite(scores)).tolist()
            raise ValueError(f"layer {name}: {discriminant} gave non-finite scores for channels {bad[:10]}")
        out.append(LayerScores(name, "coarse" if coarse else "fine", scores))
    return out


def block_indices(layers: list[str], block_of: dict[str, str] | None) -> dict[str, int]:
    """Each layer's 0-based block index, blocks numbered in the order their first layer comes."""
    order: dict[str, int] = {}
    for layer in layers:
        order.setdefault((block_of or {}).get(layer, layer), len(order))
    return {layer: order[(block_of or {}).get(layer, layer)] for layer in layers}
