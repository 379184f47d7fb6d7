"""Coarse classes from a confusion matrix, and the coarse/fine block threshold."""

from __future__ import annotations

import numpy as np
import pytest

from cdc.hierarchy import coarse_block_count, coarse_groups, confusion_affinity
from cdc.scoring import score_layers
from cdc.stats import LayerStats


def test_spectral_clustering_recovers_confused_blocks(rng):
    groups = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    cm = np.diag(rng.integers(800, 1000, 10)).astype(float)
    for i in range(10):
        for j in range(10):
            if i != j and groups[i] == groups[j]:
                cm[i, j] = rng.integers(20, 60)
    got = coarse_groups(cm, 4, seed=0)
    # same partition, canonical ids in order of first class
    assert got.tolist() == groups.tolist()
    assert np.array_equal(coarse_groups(cm, 4, seed=0), got)


def test_affinity_is_symmetric_row_normalized_without_diagonal():
    cm = np.array([[90, 10, 0], [30, 70, 0], [0, 0, 100]])
    a = confusion_affinity(cm)
    assert np.allclose(a, a.T) and np.all(np.diag(a) == 0)
    assert a[0, 1] == pytest.approx((0.1 + 0.3) / 2 + 1e-6)


def test_coarse_block_count():
    assert coarse_block_count(27, None, 0.52) == 14  # ResNet-56 in the paper
    assert coarse_block_count(9, None, 0.52) == 5
    assert coarse_block_count(9, 3, 0.52) == 3
    with pytest.raises(ValueError, match="coarse_blocks"):
        coarse_block_count(9, 10, 0.5)


def test_first_t_layers_are_scored_on_coarse_labels(rng):
    def stats() -> LayerStats:
        return LayerStats(np.full(4, 10), 4, rng.random((4, 3)) * 40, rng.random((4, 3)) * 400 + 400)

    layers = {f"l{i}": stats() for i in range(5)}
    fine_to_coarse = np.array([0, 0, 1, 1])
    out = score_layers(layers, "fisher", fine_to_coarse, coarse_blocks=2, seed=0)
    assert [s.level for s in out] == ["coarse", "coarse", "fine", "fine", "fine"]
    from cdc.discriminants import fisher

    np.testing.assert_allclose(out[0].scores, fisher(layers["l0"].grouped(fine_to_coarse, 2), rng))
    np.testing.assert_allclose(out[3].scores, fisher(layers["l3"], rng))
