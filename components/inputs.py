"""A stage's input files loaded with the cross-checks between them, before any work: a model of
another dataset or architecture, statistics or scores of another model, a groups file of another
class count each fail with one line naming the file and the stage to rerun (cdc.errors.InputError)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cdc.data import Prepared
from cdc.errors import InputError, reading
from cdc.io import expect_model, load_model, read_json
from cdc.models import PrunableNet
from cdc.stats import LayerStats


def teacher(path: Path, data: Prepared) -> tuple[PrunableNet, dict[str, Any]]:
    """The teacher, refused unless it was built for the prepared dataset's classes and channels."""
    model, record = load_model(path, "teacher model")
    expect_model(
        path,
        record,
        "it was trained on another dataset: rerun train_teacher",
        num_classes=data.num_classes,
        in_channels=data.input_shape[0],
    )
    return model, record


def pruned(path: Path, teacher_record: dict[str, Any], what: str = "pruned model") -> PrunableNet:
    """A model pruned from `teacher_record`'s architecture (same arch, classes and channels, no layer
    wider than the teacher's)."""
    model, record = load_model(path, what)
    fix = "it was pruned from another teacher: rerun prune"
    expect_model(path, record, fix, **{k: teacher_record[k] for k in ("arch", "num_classes", "in_channels")})
    if any(w > t for w, t in zip(record["widths"], teacher_record["widths"], strict=True)):
        raise InputError(f"{path}: widths {record['widths']} exceed the teacher's; {fix}", path)
    return model


def stats_of(path: Path, stats: dict[str, LayerStats], model: PrunableNet, num_classes: int) -> None:
    """Refuse statistics collected from another model or dataset than `model` and the prepared data."""
    layers = {layer.name: layer.conv.out_channels for layer in model.prunable_layers()}
    found = {name: s.s1.shape[1] for name, s in stats.items()}
    if found != layers:
        raise InputError(
            f"{path}: statistics of other layers/widths ({found}) than the teacher's ({layers}); "
            "rerun dump_stats on this teacher",
            path,
        )
    classes = {len(s.n) for s in stats.values()}
    if classes != {num_classes}:
        raise InputError(
            f"{path}: statistics over {sorted(classes)} classes, the dataset has {num_classes}; "
            "rerun dump_stats",
            path,
        )


def confusion(path: Path) -> tuple[list[str], np.ndarray]:
    """The classes and the K x K validation confusion matrix written by dump_stats."""
    record = read_json(path, "confusion matrix (JSON)")
    with reading(path, "confusion matrix (JSON)"):
        classes, matrix = list(record["classes"]), np.asarray(record["matrix"], np.float64)
    if matrix.shape != (len(classes), len(classes)) or not np.isfinite(matrix).all():
        raise InputError(f"{path}: matrix of shape {matrix.shape} for {len(classes)} classes", path)
    return classes, matrix


def fine_to_coarse(path: Path, num_classes: int) -> np.ndarray:
    """The coarse group of each class written by score (groups.json)."""
    record = read_json(path, "coarse groups (JSON)")
    with reading(path, "coarse groups (JSON)"):
        groups = np.asarray(record["fine_to_coarse"], np.int64)
    if groups.shape != (num_classes,) or groups.min() < 0:
        raise InputError(
            f"{path}: fine_to_coarse must give a group id >= 0 for each of the {num_classes} classes, "
            f"got {groups.tolist()}; rerun score",
            path,
        )
    return groups


DCA_KEYS = ("w_teacher", "w_student", "layer", "pool", "label_map", "images", "centroids_teacher")


def dca_bases(path: Path, teacher_model: PrunableNet) -> dict[str, np.ndarray]:
    """The DCA bases written by fit_dca, refused when a key is missing or the layer is not the model's."""
    with reading(path, "DCA bases (.npz)"), np.load(path, allow_pickle=False) as z:
        dca = {k: z[k] for k in z.files}
    missing = [k for k in DCA_KEYS if k not in dca]
    if missing:
        raise InputError(f"{path}: DCA bases without {missing}; rerun fit_dca", path)
    if str(dca["layer"]) not in teacher_model.dca_layers():
        raise InputError(
            f"{path}: bases of layer {dca['layer']}, not a layer of the teacher; rerun fit_dca", path
        )
    return dca
