"""Stage `prune`: remove the lowest-scored channels of each layer under the budget, physically.

Outputs the pruned model (arch + per-layer widths + state dict) and a report of widths, FLOPs
(multiply-accumulates of conv and linear layers) and params before and after.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from functools import cache
from pathlib import Path

import numpy as np

from cdc.data import load_prepared, stratified_subset
from cdc.errors import InputError
from cdc.flops import count_macs, count_macs_of, count_params
from cdc.io import build_like, load_model, read_json, save_model, write_json
from cdc.latency_model import LatencyTable
from cdc.models import PrunableNet
from cdc.params import Params
from cdc.pruning import (
    BudgetProbe,
    budget_reads,
    channels_to_remove,
    keep_counts,
    prune_channels,
    silencing_probe,
)
from cdc.stats_table import SCORES_SCHEMA, read_checked
from components.tracking import StageTracker

log = logging.getLogger(__name__)


def run(params: Params, inputs: dict[str, Path], outputs: dict[str, Path], tracker: StageTracker) -> None:
    model, record = load_model(inputs["teacher"], "teacher model")
    input_shape = tuple(
        read_json(inputs["prepared"] / "meta.json", "prepared dataset metadata")["input_shape"]
    )
    scores = read_checked(inputs["scores"], SCORES_SCHEMA, "table of channel scores").to_pandas()
    names = [layer.name for layer in model.prunable_layers()]
    widths_before = model.prunable_widths()
    layer_scores = [scores[scores["layer"] == n].sort_values("channel")["score"].to_numpy() for n in names]
    counts = [len(s) for s in layer_scores]
    if sorted(scores["layer"].unique()) != sorted(names) or counts != widths_before:
        raise InputError(
            f"{inputs['scores']}: scores another model (layers {sorted(scores['layer'].unique())}) than "
            f"{inputs['teacher']} (layers {names}, widths {widths_before}); rerun score on this teacher",
            inputs["scores"],
        )
    if not all(np.isfinite(s).all() for s in layer_scores):
        raise InputError(f"{inputs['scores']}: holds non-finite scores; rerun score", inputs["scores"])
    table = latency_table(params, inputs["latency_table"], names, widths_before)
    probe = budget_probe(params, inputs["prepared"], model, record, layer_scores, input_shape)
    probe.latency = table
    keep = keep_counts(params.prune.budget, names, widths_before, params.prune.model_dump(), probe)
    removals = {name: channels_to_remove(s, k) for name, s, k in zip(names, layer_scores, keep, strict=True)}
    before = {"flops": count_macs(model, input_shape), "params": count_params(model)}
    discovery = [asdict(d) for d in model.discovered()]  # the teacher's layers, before the cut
    prune_channels(model, removals, input_shape)
    after = {"flops": count_macs(model, input_shape), "params": count_params(model)}
    save_model(outputs["model"], model, record["arch"], record["num_classes"], record["in_channels"])
    report = {
        "budget": params.prune.budget,
        "round_to": params.prune.round_to,
        "flops_target": params.prune.flops_target if budget_reads(params.prune.budget).flops_target else None,
        "sensitivity_trace": probe.trace or None,
        **latency_prediction(params, table, widths_before, keep),
        "layers": names,
        "layer_discovery": discovery,  # every conv (an imported arch): prunable, or why it is left whole
        "widths_before": widths_before,
        "widths_after": model.prunable_widths(),
        "removed_channels": removals,
        "flops_before": before["flops"],
        "flops_after": after["flops"],
        "params_before": before["params"],
        "params_after": after["params"],
        "flops_ratio": after["flops"] / before["flops"],
        "params_ratio": after["params"] / before["params"],
    }
    write_json(outputs["report"], report)
    logged = ("flops_before", "flops_after", "flops_ratio", "params_ratio", "predicted_latency_ratio")
    tracker.log_metrics({k: report[k] for k in logged if report.get(k) is not None})
    log.info(
        "pruned to %.1f%% of FLOPs, %.1f%% of params; widths %s",
        100 * report["flops_ratio"],
        100 * report["params_ratio"],
        model.prunable_widths(),
    )


def budget_probe(
    params: Params,
    prepared: Path,
    model: PrunableNet,
    record: dict,
    layer_scores: list,
    input_shape: tuple[int, ...],
) -> BudgetProbe:
    """What the measuring budgets read: FLOPs of candidate widths, the scores, and for the budgets that
    read accuracy (`flops_target`, `latency_target`) the teacher's accuracy on validation images with
    channels silenced."""

    @cache
    def flops(widths: tuple[int, ...]) -> int:
        return count_macs_of(lambda: build_like(record, list(widths)), input_shape)

    if not budget_reads(params.prune.budget).accuracy:
        return BudgetProbe(lambda w: flops(tuple(w)), layer_scores)
    data = load_prepared(prepared)
    idx = stratified_subset(data.val.labels, params.prune.sensitivity_images, params.seed)
    batches = data.batches(data.val.subset(idx), 500)
    log.info("%s: sensitivity analysis on %d validation images", params.prune.budget, len(idx))
    return silencing_probe(model, layer_scores, batches, lambda w: flops(tuple(w)))


def latency_table(params: Params, path: Path, names: list[str], widths: list[int]) -> LatencyTable | None:
    """The target's latency table where the budget reads one, checked against the teacher."""
    if not budget_reads(params.prune.budget).latency:
        return None
    table = LatencyTable.load(path)
    if table is None:
        raise InputError(f"{path}: no latency table was measured; rerun latency_table (cdc repro)", path)
    if table.layers != names or table.widths != widths:
        raise InputError(
            f"{path}: a table of another model (layers {table.layers}, widths {table.widths}) than the "
            f"teacher ({names}, {widths}); rerun latency_table on this teacher",
            path,
        )
    return table


def latency_prediction(
    params: Params, table: LatencyTable | None, before: list[int], after: list[int]
) -> dict:
    """The report's latency figures: the target, the table's prediction for teacher and pruned model,
    and the conditions it holds for (evaluate measures the same ratio on the models)."""
    if table is None:
        return {"latency_target": None}
    teacher_ms, pruned_ms = table.predict(before), table.predict(after)
    return {
        "latency_target": params.prune.latency_target,
        "predicted_latency_ms_before": teacher_ms,
        "predicted_latency_ms_after": pruned_ms,
        "predicted_latency_ratio": pruned_ms / teacher_ms,
        "latency_table": table.key(),
    }
