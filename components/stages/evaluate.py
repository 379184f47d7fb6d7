"""Stage `evaluate`: test (and validation) accuracy, FLOPs, params and latency of teacher, pruned and student.

"pruned" is the pruned model before fine-tuning with its BN statistics recalibrated on training data:
the cleanest measure of which channels were kept. Writes DVC metrics JSON, a markdown report and
PNG plots (DVC's own HTML plots need a CDN and do not render offline).

Latency is measured on the device the stage runs on (`runtime.device`), in the inference form a
deployment would run (`evaluate.latency_form`, BN folded by default), the three models interleaved on a
fixed thread count (cdc.latency): speed-ups are medians of per-round ratios, with their spread. The
device, form and threads are recorded next to the figures.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import torch
from matplotlib.figure import Figure

from cdc.data import Prepared, load_prepared
from cdc.errors import InputError
from cdc.flops import count_macs, count_params
from cdc.inference import inference_forward
from cdc.io import atomic_path, read_json, write_json
from cdc.latency import compare_latency, threads
from cdc.params import Params
from cdc.train import evaluate, recalibrate_bn
from components import inputs as checked
from components.runtime import stage_runtime
from components.tracking import StageTracker

log = logging.getLogger(__name__)
MODELS = ("teacher", "pruned", "student")


def run(params: Params, inputs: dict[str, Path], outputs: dict[str, Path], tracker: StageTracker) -> None:
    p = params.evaluate
    runtime = stage_runtime(params, tracker)
    device = runtime.device
    torch.manual_seed(params.seed)
    data = load_prepared(inputs["prepared"], params.data.workers)
    shape = data.input_shape
    teacher, record = checked.teacher(inputs["teacher"], data)
    models = {"teacher": teacher}
    for name in ("pruned", "student"):
        models[name] = checked.pruned(inputs[name], record, f"{name} model")
    models = {name: models[name].to(device) for name in MODELS}
    recalibrate_pruned(models["pruned"], data, params, device)

    if p.latency_form == "onnxruntime" and device.type != "cpu":
        raise InputError(f"evaluate.latency_form onnxruntime runs on CPU only; the stage runs on {device}")
    metrics: dict = {}
    for name, model in models.items():
        metrics[name] = {
            **accuracies(model, data, p.batch_size, device),
            "flops": count_macs(model, shape),
            "params": count_params(model),
        }
    t, s = metrics["teacher"], metrics["student"]
    ratios: dict = {
        "acc_drop_points": 100 * (t["test_acc"] - s["test_acc"]),
        "flops_ratio": s["flops"] / t["flops"],
        "params_ratio": s["params"] / t["params"],
    }
    with threads(p.latency_threads if device.type == "cpu" else None) as n_threads:
        for bs in p.latency_batch_sizes:
            x = torch.randn(bs, *shape, device=device)
            forwards = {n: inference_forward(m, p.latency_form, x, n_threads) for n, m in models.items()}
            latency = compare_latency(forwards, rounds=p.latency_rounds, device=device)
            for name in MODELS:
                metrics[name][f"latency_ms_b{bs}"] = latency[name].ms
            ratios[f"speedup_b{bs}"] = latency["student"].speedup
            ratios[f"speedup_b{bs}_spread"] = latency["student"].spread
    for name in MODELS:
        log.info("%s: %s", name, metrics[name])
    prune_report = read_json(inputs["prune_report"])
    if prune_report.get("latency_target") is not None:  # the table's prediction, beside the measurement
        ratios["latency_target"] = prune_report["latency_target"]
        ratios["predicted_latency_ratio"] = prune_report["predicted_latency_ratio"]
    metrics["student_vs_teacher"] = ratios
    metrics["latency_device"] = runtime.describe()
    metrics["latency_form"] = p.latency_form
    metrics["latency_threads"] = n_threads
    write_json(outputs["metrics"], metrics)
    tracker.log_metrics(
        {f"{g}.{k}": v for g, d in metrics.items() if isinstance(d, dict) for k, v in d.items()}
    )

    with atomic_path(outputs["plots"]) as tmp:
        tmp.mkdir()
        plot_curves(
            tmp / "training_curves.png",
            read_csv(inputs["teacher_history"]),
            read_csv(inputs["student_history"]),
        )
        plot_tradeoff(tmp / "accuracy_vs_flops.png", metrics)
        plot_widths(tmp / "widths.png", prune_report)
    with atomic_path(outputs["report"]) as tmp:
        tmp.write_text(render_report(metrics, prune_report, p.latency_batch_sizes))


def recalibrate_pruned(model: torch.nn.Module, data: Prepared, params: Params, device: torch.device) -> None:
    """Fresh BN statistics for the pruned model from seeded training batches ("pruned" in the report)."""
    recal = data.batches("train", 128, shuffle=True, seed=params.seed, device=device)
    recalibrate_bn(model, recal, params.evaluate.bn_recalibration_batches)


def accuracies(model: torch.nn.Module, data: Prepared, batch_size: int, device: torch.device) -> dict:
    return {
        "test_acc": evaluate(model, data.batches("test", batch_size, device=device)).accuracy,
        "val_acc": evaluate(model, data.batches("val", batch_size, device=device)).accuracy,
    }


def read_csv(path: Path) -> list[dict[str, float]]:
    with path.open() as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def summary_table(metrics: dict, batch_sizes: list[int]) -> str:
    """Markdown table: teacher vs pruned vs student."""
    lat = [f"latency b{bs} (ms)" for bs in batch_sizes]
    head = "| model | test acc (%) | MFLOPs (MACs) | params (k) | " + " | ".join(lat) + " |"
    lines = [head, "|" + "---|" * (4 + len(lat))]
    labels = {
        "teacher": "teacher",
        "pruned": "pruned, BN recal., no fine-tune",
        "student": "student (distilled)",
    }
    for name in MODELS:
        m = metrics[name]
        cells = [
            labels[name],
            f"{100 * m['test_acc']:.2f}",
            f"{m['flops'] / 1e6:.2f}",
            f"{m['params'] / 1e3:.1f}",
        ]
        cells += [f"{m[f'latency_ms_b{bs}']:.2f}" for bs in batch_sizes]
        lines.append("| " + " | ".join(cells) + " |")
    r = metrics["student_vs_teacher"]
    speed = ", ".join(
        f"{r[f'speedup_b{bs}']:.2f}x ± {r[f'speedup_b{bs}_spread']:.2f} at batch {bs}" for bs in batch_sizes
    )
    speed += f" ({latency_conditions(metrics)})"
    lines.append("")
    lines.append(
        f"Student vs teacher: {-r['acc_drop_points']:+.2f} points of test accuracy, "
        f"{100 * r['flops_ratio']:.1f}% of the "
        f"FLOPs, {100 * r['params_ratio']:.1f}% of the params, measured speed-up {speed}."
    )
    return "\n".join(lines)


def latency_conditions(metrics: dict) -> str:
    """Where and how latency was timed, e.g. `cpu, folded form, 2 threads`."""
    device = metrics["latency_device"]
    if device.startswith("cpu"):
        return f"cpu, {metrics['latency_form']} form, {metrics['latency_threads']} threads"
    return f"{device}, {metrics['latency_form']} form"


def latency_budget_summary(metrics: dict, prune_report: dict) -> str:
    """The latency budget's target, the table's prediction and what was measured at the table's batch
    size ('' under another budget)."""
    if prune_report.get("latency_target") is None:
        return ""
    table, r = prune_report["latency_table"], metrics["student_vs_teacher"]
    target = (
        f"{table['device']} ({table['machine']}), batch {table['batch']}, {table['form']} form, "
        f"{table['threads']} threads"
    )
    measured = r.get(f"speedup_b{table['batch']}")
    measured_text = (
        f"measured {100 / measured:.1f}% at batch {table['batch']} ({latency_conditions(metrics)})"
        if measured
        else f"not measured at batch {table['batch']} (add it to evaluate.latency_batch_sizes)"
    )
    return (
        f"Latency budget: at most {100 * r['latency_target']:.0f}% of the teacher's latency on {target}; "
        f"the table predicts {100 * r['predicted_latency_ratio']:.1f}%, {measured_text}; "
        f"{100 * r['flops_ratio']:.1f}% of the FLOPs.\n\n"
    )


def render_report(metrics: dict, prune_report: dict, batch_sizes: list[int]) -> str:
    widths = "\n".join(
        f"| {n} | {a} | {b} |"
        for n, a, b in zip(
            prune_report["layers"], prune_report["widths_before"], prune_report["widths_after"], strict=True
        )
    )
    return (
        "# CDC evaluation report\n\n"
        "FLOPs are multiply-accumulates of conv and linear layers for one image; latency is the median "
        f"over interleaved rounds of forward passes ({latency_conditions(metrics)}); a speed-up is the "
        "median of per-round ratios, ± half their interquartile range.\n\n"
        f"{summary_table(metrics, batch_sizes)}\n\n"
        f"{latency_budget_summary(metrics, prune_report)}"
        f"## Pruned widths ({prune_report['budget']} budget)\n\n"
        f"| layer | before | after |\n|---|---|---|\n{widths}\n\n"
        "![training curves](plots/training_curves.png)\n![accuracy vs FLOPs](plots/accuracy_vs_flops.png)\n"
        "![widths](plots/widths.png)\n"
    )


def plot_curves(path: Path, teacher: list[dict], student: list[dict]) -> None:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot([r["epoch"] for r in teacher], [100 * r["val_acc"] for r in teacher], "o-", label="teacher")
    offset = teacher[-1]["epoch"] if teacher else 0
    ax.plot(
        [offset + r["epoch"] for r in student],
        [100 * r["val_acc"] for r in student],
        "s-",
        label="student (distill)",
    )
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_tradeoff(path: Path, metrics: dict) -> None:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for name in MODELS:
        ax.scatter(metrics[name]["flops"] / 1e6, 100 * metrics[name]["test_acc"], s=60, label=name)
    ax.set_xlabel("MFLOPs (MACs)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_widths(path: Path, report: dict) -> None:
    fig = Figure(figsize=(max(6, 0.3 * len(report["layers"])), 4))
    ax = fig.subplots()
    x = range(len(report["layers"]))
    ax.bar(x, report["widths_before"], label="teacher", alpha=0.5)
    ax.bar(x, report["widths_after"], label="pruned", alpha=0.8)
    ax.set_xticks(list(x), report["layers"], rotation=90, fontsize=7)
    ax.set_ylabel("channels")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
