"""Stage `fit_dca`: DCA bases of one intermediate layer for the teacher and the pruned student.

Fitted on (a class-balanced cap of) the training split; the student's components are sign-aligned
to the teacher's. Output `dca.npz`: w_teacher, w_student (d x L), centroids_teacher (L x d),
label_map (fine class -> DCA label), layer, pool.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from cdc.data import load_prepared, stratified_subset
from cdc.dca import accumulate_scatter, align_signs, fit_dca
from cdc.io import atomic_path
from cdc.models import PrunableNet
from cdc.params import Params
from components import inputs as checked
from components.progress import progress
from components.runtime import stage_runtime
from components.tracking import StageTracker

log = logging.getLogger(__name__)


def label_map_for(level: str, groups_path: Path, num_classes: int) -> np.ndarray:
    if level == "fine":
        return np.arange(num_classes)
    return checked.fine_to_coarse(groups_path, num_classes)


def run(params: Params, inputs: dict[str, Path], outputs: dict[str, Path], tracker: StageTracker) -> None:
    p = params.fit_dca
    runtime = stage_runtime(params, tracker)
    data = load_prepared(inputs["prepared"], params.data.workers)
    teacher, record = checked.teacher(inputs["teacher"], data)
    student = checked.pruned(inputs["pruned"], record).to(runtime.device)
    teacher.to(runtime.device)
    keep = stratified_subset(data.train.labels, p.max_images, params.seed)
    data.train = data.train.subset(keep)
    label_map = label_map_for(p.labels, inputs["groups"], data.num_classes)

    def fit(model: PrunableNet, who: str) -> tuple[np.ndarray, np.ndarray]:
        batches = progress(
            data.batches("train", p.batch_size, device=runtime.device), f"DCA features ({who})"
        )
        acc = accumulate_scatter(model, p.layer, p.pool, batches, label_map)
        return fit_dca(acc), acc.centroids()

    w_t, cent_t = fit(teacher, "teacher")
    w_s, cent_s = fit(student, "student")
    w_s = align_signs(w_s, cent_s, w_t, cent_t)
    with atomic_path(outputs["dca"]) as tmp, tmp.open("wb") as fh:
        np.savez(
            fh,
            w_teacher=w_t,
            w_student=w_s,
            centroids_teacher=cent_t,
            label_map=label_map,
            images=len(keep),
            layer=np.array(p.layer),
            pool=np.array(p.pool or 0),
        )
    tracker.log_metrics({"feature_dim": w_t.shape[0], "components": w_t.shape[1], "images": len(keep)})
    log.info(
        "DCA at %s: %d features -> %d components, fitted on %d images",
        p.layer,
        w_t.shape[0],
        w_t.shape[1],
        len(keep),
    )
