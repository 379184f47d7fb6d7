"""Stage `dump_stats`: one pass of the training split through the teacher -> per-class channel statistics.

With `dump_stats.grid`, the same pass also sums each channel's map pooled to a small grid, per class
(the `di` criterion's statistics). Also writes the teacher's confusion matrix on the validation split,
from which `score` derives the coarse classes. Schema of the Parquet file: see `cdc/stats_table.py`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cdc.data import load_prepared
from cdc.io import atomic_path, write_json
from cdc.params import Params
from cdc.stats import collect_all_stats, confusion_matrix
from cdc.stats_table import write_grid_stats, write_stats
from components import inputs as checked
from components.progress import progress
from components.runtime import stage_runtime
from components.tracking import StageTracker

log = logging.getLogger(__name__)


def run(params: Params, inputs: dict[str, Path], outputs: dict[str, Path], tracker: StageTracker) -> None:
    runtime = stage_runtime(params, tracker)
    data = load_prepared(inputs["prepared"], params.data.workers)
    teacher = checked.teacher(inputs["teacher"], data)[0].to(runtime.device)
    batch_size = params.dump_stats.batch_size
    batches = data.batches("train", batch_size, device=runtime.device)
    p = params.dump_stats
    stats, grid = collect_all_stats(
        teacher, progress(batches, "activation statistics"), data.num_classes, p.grid, p.tensor, p.bn_mode
    )
    with atomic_path(outputs["stats"]) as tmp:
        write_stats(tmp, stats)
    with atomic_path(outputs["grid"]) as tmp:
        write_grid_stats(tmp, grid)
    val = data.batches("val", batch_size, device=runtime.device)
    cm = confusion_matrix(teacher, val, data.num_classes)
    write_json(outputs["confusion"], {"split": "val", "classes": data.meta["classes"], "matrix": cm.tolist()})
    val_acc = float(cm.trace() / cm.sum())
    tracker.log_metrics({"layers": len(stats), "val_acc": val_acc})
    log.info(
        "statistics of %d layers over %d images; teacher val acc %.4f", len(stats), len(data.train), val_acc
    )
