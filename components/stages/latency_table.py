"""Stage `latency_table`: the latency model of the deployment target, for `prune.budget latency_target`.

On the target the `latency` section names (device, threads, batch size, inference form), the teacher's
architecture is timed with each prunable layer narrowed in turn, in steps of `latency.step` channels,
interleaved with the full network (cdc/latency_model.py). The weights do not matter to dense kernels, so
the table is a function of the architecture and the target: DVC reruns it when either changes and
restores it from its cache when a target measured before comes back. Under another budget nothing reads
a table, so the stage writes one saying why none was measured (seconds, not minutes on a large model).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from cdc.device import cpu_model, resolve_device
from cdc.errors import InputError
from cdc.io import build_like, load_model, read_json
from cdc.latency_model import measure_table, save_unmeasured, width_steps
from cdc.params import Params
from cdc.pruning import budget_reads
from components.tracking import StageTracker

log = logging.getLogger(__name__)


def run(params: Params, inputs: dict[str, Path], outputs: dict[str, Path], tracker: StageTracker) -> None:
    p = params.latency
    if not budget_reads(params.prune.budget).latency:
        save_unmeasured(outputs["table"], f"prune.budget {params.prune.budget} reads no latency table")
        log.info("no latency table measured: prune.budget %s reads none", params.prune.budget)
        return
    device = resolve_device(p.device)
    if p.form == "onnxruntime" and device.type != "cpu":
        raise InputError(f"latency.form onnxruntime runs on CPU only, not latency.device {p.device}")
    teacher, record = load_model(inputs["teacher"], "teacher model")
    input_shape = read_json(inputs["prepared"] / "meta.json", "prepared dataset metadata")["input_shape"]
    names = [layer.name for layer in teacher.prunable_layers()]
    widths = teacher.prunable_widths()
    models = sum(len(width_steps(w, p.step)) for w in widths)
    log.info(
        "timing %d width variants of %s on %s, batch %d, %s form (%d rounds each layer)",
        models, record["arch"], device, p.batch_size, p.form, p.rounds,
    )  # fmt: skip
    table = measure_table(
        lambda w: build_like(record, w),
        record["arch"],
        names,
        widths,
        list(input_shape),
        p.batch_size,
        p.step,
        p.form,
        device=device,
        n_threads=p.threads if device.type == "cpu" else None,
        rounds=p.rounds,
        progress=log.info,
    )
    table.machine = cpu_model() if device.type == "cpu" else torch.cuda.get_device_name(device)
    table.save(outputs["table"])
    tracker.log_metrics({"latency.full_ms": table.full_ms, "latency.threads": table.threads})
    log.info("full model: %.3f ms per batch of %d on %s", table.full_ms, p.batch_size, table.machine)
