"""Stage `prepare`: raw dataset -> seeded train/validation split + test set, as .npz and meta.json."""

from __future__ import annotations

import logging
from pathlib import Path

from cdc.data import (
    Split,
    channel_mean_std,
    check_classes,
    load_raw,
    save_split,
    stratified_split,
    stratified_subset,
)
from cdc.io import atomic_path, write_json
from cdc.params import Params
from components.tracking import StageTracker

log = logging.getLogger(__name__)


def run(params: Params, inputs: dict[str, Path], outputs: dict[str, Path], tracker: StageTracker) -> None:
    p = params.data
    raw = load_raw(p.dataset, inputs["raw"])
    train_idx = stratified_subset(raw.train.labels, p.train_limit, params.seed)
    test_idx = stratified_subset(raw.test.labels, p.test_limit, params.seed)
    full = Split(raw.train.images[train_idx], raw.train.labels[train_idx])
    if p.val_size >= len(full):
        raise ValueError(f"data.val_size={p.val_size} leaves no training images (only {len(full)} available)")
    fit_idx, val_idx = stratified_split(full.labels, p.val_size / len(full), params.seed)
    splits = {
        "train": Split(full.images[fit_idx], full.labels[fit_idx]),
        "val": Split(full.images[val_idx], full.labels[val_idx]),
        "test": Split(raw.test.images[test_idx], raw.test.labels[test_idx]),
    }
    for name, split in splits.items():
        check_classes(split, raw.classes, f"data.dataset {p.dataset} ({name} split)", name == "train")
    mean, std = channel_mean_std(splits["train"].images)
    meta = {
        "dataset": p.dataset,
        "classes": raw.classes,
        "input_shape": list(splits["train"].images.shape[1:]),
        "mean": mean,
        "std": std,
        "sizes": {name: len(s) for name, s in splits.items()},
    }
    with atomic_path(outputs["prepared"]) as tmp:
        tmp.mkdir()
        for name, split in splits.items():
            save_split(tmp / f"{name}.npz", split)
        write_json(tmp / "meta.json", meta)
    log.info("prepared %s: %s", p.dataset, meta["sizes"])
    tracker.log_metrics({f"{name}_images": len(s) for name, s in splits.items()})
