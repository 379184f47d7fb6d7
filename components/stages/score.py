"""Stage `score`: coarse classes from the confusion matrix, then a score per channel by `score.criterion`.

Class discriminants read the statistics (hierarchically: coarse labels for blocks 1..T unless
`score.hierarchy` is false); the data-free criteria read the teacher's weights and `taylor` its gradients
on training batches (cdc/criteria.py). Outputs: `scores.parquet` (layer, layer_index, channel, score,
label_level) and `groups.json` (the fine -> coarse map, its source and T).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cdc.criteria import CRITERIA, taylor_scores, weight_scores
from cdc.data import load_prepared
from cdc.errors import InputError
from cdc.hierarchy import coarse_block_count, coarse_groups
from cdc.io import atomic_path, load_model, read_json, write_json
from cdc.params import Params
from cdc.scoring import LayerScores, score_layers
from cdc.stats_table import SCORES_SCHEMA, read_grid_stats, read_stats
from components import inputs as checked
from components.runtime import stage_runtime
from components.tracking import StageTracker

log = logging.getLogger(__name__)


def run(params: Params, inputs: dict[str, Path], outputs: dict[str, Path], tracker: StageTracker) -> None:
    p = params.score
    criterion = CRITERIA.get(p.criterion)
    stats = read_stats(inputs["stats"])
    classes, matrix = checked.confusion(inputs["confusion"])
    teacher = load_model(inputs["teacher"], "teacher model")[0]
    checked.stats_of(inputs["stats"], stats, teacher, len(classes))
    if isinstance(p.coarse_map, str):
        fine_to_coarse, source = (
            dataset_coarse_map(inputs["prepared"], p.coarse_map, len(classes)),
            p.coarse_map,
        )
    elif p.coarse_map is not None:
        if len(p.coarse_map) != len(classes) or min(p.coarse_map) < 0:
            raise InputError(
                f"score.coarse_map must give a group id >= 0 for each of the {len(classes)} classes, "
                f"got {p.coarse_map}"
            )
        fine_to_coarse, source = np.asarray(p.coarse_map, np.int64), "params"
    else:
        fine_to_coarse = coarse_groups(matrix, p.n_coarse, params.seed)
        source = "spectral_clustering"
    blocks = teacher.layer_blocks()
    block_of = {layer: block for block, layers in blocks.items() for layer in layers}
    t = coarse_block_count(len(blocks), p.coarse_blocks, p.coarse_fraction) if p.hierarchy else 0
    if criterion.source == "stats":
        scored = score_layers(stats, p.criterion, fine_to_coarse, t, params.seed, p.eps, block_of)
    elif criterion.source == "grid":
        grid = read_grid_stats(inputs["grid"])
        if list(grid) != list(stats):
            raise InputError(
                f"score.criterion {p.criterion} needs the pooled-grid statistics in {inputs['grid']}, "
                "which has none: set dump_stats.grid (e.g. 4) and rerun dump_stats"
            )
        scored = score_layers(grid, p.criterion, fine_to_coarse, t, params.seed, p.eps, block_of)
    else:
        scored = model_scores(params, inputs, list(stats), tracker)
    if not criterion.class_discriminant:
        t = 0

    rows: dict[str, list] = {"layer": [], "layer_index": [], "channel": [], "score": [], "label_level": []}
    for index, ls in enumerate(scored):
        n = len(ls.scores)
        rows["layer"] += [ls.layer] * n
        rows["layer_index"] += [index] * n
        rows["channel"] += list(range(n))
        rows["score"] += ls.scores.tolist()
        rows["label_level"] += [ls.level] * n
    with atomic_path(outputs["scores"]) as tmp:
        pq.write_table(pa.table(rows, schema=SCORES_SCHEMA), tmp)
    n_groups = int(fine_to_coarse.max()) + 1
    groups = [[classes[k] for k in np.flatnonzero(fine_to_coarse == g)] for g in range(n_groups)]
    write_json(
        outputs["groups"],
        {
            "fine_to_coarse": fine_to_coarse.tolist(),
            "n_groups": n_groups,
            "groups": groups,
            "source": source,
            "coarse_blocks": t,
            "layers": len(stats),
            # every layer of a block gets the block's labels; the first `coarse_blocks` are coarse
            "blocks": [
                {"block": block, "layers": layers, "level": "coarse" if k < t else "fine"}
                for k, (block, layers) in enumerate(blocks.items())
            ],
            "criterion": p.criterion,
        },
    )
    tracker.log_metrics({"coarse_blocks": t, "n_groups": n_groups})
    log.info(
        "scored %d layers in %d blocks with %s; T=%d coarse blocks; groups: %s",
        len(stats), len(blocks), p.criterion, t, groups,
    )  # fmt: skip


def dataset_coarse_map(prepared: Path, name: str, num_classes: int) -> np.ndarray:
    """A dataset's own grouping of its classes, as `prepare` recorded it from the data's coarse labels."""
    meta_path = prepared / "meta.json"
    coarse = read_json(meta_path, "prepared dataset metadata").get("coarse")
    if coarse is None or coarse["name"] != name or len(coarse["fine_to_coarse"]) != num_classes:
        raise InputError(
            f"{meta_path}: the dataset records no {name} for its {num_classes} classes; rerun `cdc prepare`",
            meta_path,
        )
    return np.asarray(coarse["fine_to_coarse"], np.int64)


def model_scores(
    params: Params, inputs: dict[str, Path], layers: list[str], tracker: StageTracker
) -> list[LayerScores]:
    """Scores of a criterion that reads the teacher itself (weights or gradients), not the statistics."""
    p = params.score
    runtime = stage_runtime(params, tracker)
    teacher = load_model(inputs["teacher"])[0].to(runtime.device)
    data = load_prepared(inputs["prepared"], params.data.workers)
    if CRITERIA.get(p.criterion).source == "weights":
        teacher.cpu()
        by_layer = weight_scores(p.criterion, teacher, data.input_shape)
    else:
        batches = data.batches("train", 128, shuffle=True, seed=params.seed, device=runtime.device)
        by_layer = taylor_scores(teacher, batches, p.taylor_batches)
    if list(by_layer) != layers:
        raise InputError(f"{inputs['teacher']} has prunable layers {list(by_layer)}, the statistics {layers}")
    return [LayerScores(name, "none", np.asarray(s, np.float64)) for name, s in by_layer.items()]
