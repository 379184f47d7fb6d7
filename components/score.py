"""Stage `score`: coarse classes from the confusion matrix, then a discriminant score per channel.

Outputs: `scores.parquet` (layer, layer_index, channel, score, label_level) and `groups.json`
(the fine -> coarse map, its source and T).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cdc.hierarchy import coarse_block_count, coarse_groups
from cdc.io import atomic_path, read_json, write_json
from cdc.params import Params
from cdc.scoring import score_layers
from cdc.stats_table import read_stats
from components.tracking import StageTracker

log = logging.getLogger(__name__)


def run(params: Params, inputs: dict[str, Path], outputs: dict[str, Path], tracker: StageTracker) -> None:
    p = params.score
    stats = read_stats(inputs["stats"])
    confusion = read_json(inputs["confusion"])
    classes = confusion["classes"]
    if p.coarse_map is not None:
        if len(p.coarse_map) != len(classes) or min(p.coarse_map) < 0:
            raise ValueError(
                f"score.coarse_map must give a group id >= 0 for each of the {len(classes)} classes, "
                f"got {p.coarse_map}"
            )
        fine_to_coarse, source = np.asarray(p.coarse_map, np.int64), "params"
    else:
        fine_to_coarse = coarse_groups(np.asarray(confusion["matrix"]), p.n_coarse, params.seed)
        source = "spectral_clustering"
    t = coarse_block_count(len(stats), p.coarse_blocks, p.coarse_fraction)
    scored = score_layers(stats, p.discriminant, fine_to_coarse, t, params.seed)

    rows: dict[str, list] = {"layer": [], "layer_index": [], "channel": [], "score": [], "label_level": []}
    for index, ls in enumerate(scored):
        n = len(ls.scores)
        rows["layer"] += [ls.layer] * n
        rows["layer_index"] += [index] * n
        rows["channel"] += list(range(n))
        rows["score"] += ls.scores.tolist()
        rows["label_level"] += [ls.level] * n
    with atomic_path(outputs["scores"]) as tmp:
        pq.write_table(pa.table(rows), tmp)
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
            "discriminant": p.discriminant,
        },
    )
    tracker.log_metrics({"coarse_blocks": t, "n_groups": n_groups})
    log.info(
        "scored %d layers with %s; T=%d coarse blocks; groups: %s", len(stats), p.discriminant, t, groups
    )
