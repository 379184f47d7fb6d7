"""Hierarchical labels (method §3): coarse classes from the teacher's confusion, and which blocks use them."""

from __future__ import annotations

import numpy as np

from cdc.errors import InputError

# [ours] A tiny uniform affinity keeps the confusion graph connected: classes the teacher never
# confuses (e.g. Trouser) would otherwise make the spectral embedding degenerate.
AFFINITY_FLOOR = 1e-6


def confusion_affinity(confusion: np.ndarray) -> np.ndarray:
    """A = (C + C^T) / 2 of the row-normalized confusion C with zero diagonal."""
    c = confusion.astype(np.float64)
    c = c / np.maximum(c.sum(1, keepdims=True), 1.0)
    np.fill_diagonal(c, 0.0)
    a = (c + c.T) / 2 + AFFINITY_FLOOR
    np.fill_diagonal(a, 0.0)
    return a


def coarse_groups(confusion: np.ndarray, n_groups: int, seed: int) -> np.ndarray:
    """Fine class -> coarse group id, by spectral clustering of the confusion affinity.

    Group ids are renumbered in order of each group's smallest fine class, so the map is canonical.
    """
    n = confusion.shape[0]
    if not 1 <= n_groups <= n:
        raise InputError(f"number of coarse groups must be in [1, {n}], got {n_groups}")
    if n_groups == 1:
        return np.zeros(n, np.int64)
    from sklearn.cluster import SpectralClustering  # scikit-learn loads in seconds: only where it is used

    labels = SpectralClustering(
        n_clusters=n_groups, affinity="precomputed", random_state=seed, assign_labels="discretize"
    ).fit_predict(confusion_affinity(confusion))
    order = {g: i for i, g in enumerate(dict.fromkeys(labels.tolist()))}
    return np.array([order[g] for g in labels], np.int64)


def coarse_block_count(n_blocks: int, coarse_blocks: int | None, coarse_fraction: float) -> int:
    """T: the first T blocks (1-based index <= T) are scored against coarse labels."""
    if coarse_blocks is not None:
        if not 0 <= coarse_blocks <= n_blocks:
            raise InputError(f"coarse_blocks must be in [0, {n_blocks}], got {coarse_blocks}")
        return coarse_blocks
    return int(round(coarse_fraction * n_blocks))
