"""Stage `prune`: remove the lowest-scored channels of each layer under the budget, physically.

Outputs the pruned model (arch + per-layer widths + state dict) and a report of widths, FLOPs
(multiply-accumulates of conv and linear layers) and params before and after.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow.parquet as pq

from cdc.flops import count_macs, count_params
from cdc.io import load_model, read_json, save_model, write_json
from cdc.params import Params
from cdc.pruning import channels_to_remove, keep_counts, prune_channels
from components.tracking import StageTracker

log = logging.getLogger(__name__)


def run(params: Params, inputs: dict[str, Path], outputs: dict[str, Path], tracker: StageTracker) -> None:
    model, record = load_model(inputs["teacher"])
    input_shape = tuple(read_json(inputs["prepared"] / "meta.json")["input_shape"])
    scores = pq.read_table(inputs["scores"]).to_pandas()
    layers = model.prunable_layers()
    names = [layer.name for layer in layers]
    if sorted(scores["layer"].unique()) != sorted(names):
        raise ValueError(
            f"{inputs['scores']} scores layers {sorted(scores['layer'].unique())}, model has {names}"
        )
    widths_before = model.widths()
    keep = keep_counts(params.prune.budget, names, widths_before, params.prune.model_dump())
    removals = {}
    for name, k in zip(names, keep, strict=True):
        layer_scores = scores[scores["layer"] == name].sort_values("channel")["score"].to_numpy()
        removals[name] = channels_to_remove(layer_scores, k)
    before = {"flops": count_macs(model, input_shape), "params": count_params(model)}
    prune_channels(model, removals, input_shape)
    after = {"flops": count_macs(model, input_shape), "params": count_params(model)}
    save_model(outputs["model"], model, record["arch"], record["num_classes"], record["in_channels"])
    report = {
        "budget": params.prune.budget,
        "round_to": params.prune.round_to,
        "layers": names,
        "widths_before": widths_before,
        "widths_after": model.widths(),
        "removed_channels": removals,
        "flops_before": before["flops"],
        "flops_after": after["flops"],
        "params_before": before["params"],
        "params_after": after["params"],
        "flops_ratio": after["flops"] / before["flops"],
        "params_ratio": after["params"] / before["params"],
    }
    write_json(outputs["report"], report)
    tracker.log_metrics(
        {k: report[k] for k in ("flops_before", "flops_after", "flops_ratio", "params_ratio")}
    )
    log.info(
        "pruned to %.1f%% of FLOPs, %.1f%% of params; widths %s",
        100 * report["flops_ratio"],
        100 * report["params_ratio"],
        model.widths(),
    )
