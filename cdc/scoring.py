"""Hierarchical channel scoring: coarse labels for the first T blocks, fine labels after (method §3)."""

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
) -> list[LayerScores]:
    """Score every channel of every layer (layers in forward order; block i is 1-based).

    `stats` are the scalar statistics, or the pooled-grid ones for a grid discriminant (`di`).
    `coarse_blocks` = 0 scores every layer against the fine classes (no hierarchy). `eps` replaces the
    discriminant's default ridge (`rho` for `di`); `random` has none.
    """
    fn = (
        GRID_DISCRIMINANTS[discriminant]
        if discriminant in GRID_DISCRIMINANTS
        else DISCRIMINANTS.get(discriminant)
    )
    if eps is not None and discriminant != "random":
        fn = partial(fn, **{"rho" if discriminant in GRID_DISCRIMINANTS else "eps": eps})
    n_groups = int(fine_to_coarse.max()) + 1
    out = []
    for i, (name, st) in enumerate(stats.items()):
        coarse = i + 1 <= coarse_blocks
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
