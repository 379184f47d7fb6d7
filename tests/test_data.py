"""Splits, batching and augmentation of in-memory datasets."""

from __future__ import annotations

import numpy as np
import torch

from cdc.data import Batches, Split, stratified_split, stratified_subset


def test_stratified_split_is_seeded_balanced_and_disjoint(small_split):
    labels = small_split.labels
    train, val = stratified_split(labels, 0.2, seed=3)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == len(labels)
    assert np.all(np.bincount(labels[val], minlength=10) == 6)  # 30 per class in, 20% out
    again, _ = stratified_split(labels, 0.2, seed=3)
    other, _ = stratified_split(labels, 0.2, seed=4)
    assert np.array_equal(train, again) and not np.array_equal(train, other)
    assert len(stratified_subset(labels, 100, seed=0)) == 100
    assert len(stratified_subset(labels, None, seed=0)) == len(labels)


def test_shuffled_batches_cover_every_image_once(small_split):
    seen = []
    for x, y in Batches(small_split, [0.5], [0.25], 64, shuffle=True, seed=1):
        assert x.dtype == torch.float32
        seen.append(y)
    labels = torch.cat(seen).numpy()
    assert sorted(labels.tolist()) == sorted(small_split.labels.tolist())


def test_augmentation_is_a_crop_of_the_padded_image_possibly_flipped(rng):
    images = rng.integers(0, 256, (32, 1, 28, 28), dtype=np.uint8)
    split = Split(images, np.zeros(32, np.int64))
    batches = Batches(split, [0.0], [1.0], 32, augment=True, seed=0)
    ((x, _),) = list(batches)
    raw = torch.from_numpy(images).float() / 255.0
    p = batches.pad
    padded = torch.nn.functional.pad(raw, (p, p, p, p))
    windows = [padded[..., dy : dy + 28, dx : dx + 28] for dy in range(2 * p + 1) for dx in range(2 * p + 1)]
    flipped = 0
    for i in range(32):
        plain = any(torch.equal(x[i], w[i]) for w in windows)
        mirrored = any(torch.equal(x[i], w[i].flip(-1)) for w in windows)
        assert plain or mirrored, f"image {i} is not a (flipped) crop"
        flipped += mirrored and not plain
    assert 0 < flipped < 32  # both flipped and unflipped images occur
