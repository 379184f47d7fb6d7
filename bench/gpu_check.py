"""GPU check: the whole pipeline on CUDA, tiny profile then the default one, stage by stage.

Every stage runs through the same code as `cdc <stage>` (components.runner.execute, MLflow on a SQLite
file in the work folder) with `runtime.device: cuda`, so a machine without a usable GPU fails at the
first model stage. After each model-running stage the check also asserts that the GPU allocated
memory, so a stage that silently stayed on the CPU fails loudly too. Prints one table and writes
JSON and markdown next to each other. Run it through `bench/gpu_check.sh`.

    python bench/gpu_check.py [--out bench/results/gpu_check.json] [--profiles tiny default]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from cdc.io import read_json
from cdc.params import Params, validate_params
from components.runner import execute
from components.stages import RAW, STAGE_BY_NAME, STAGES

PROFILES = {
    "tiny": {
        "data": {"train_limit": 2000, "test_limit": 500, "val_size": 200},
        "train_teacher": {"epochs": 1},
        "fit_dca": {"max_images": 1000},
        "distill": {"epochs": 1, "refit_every": 1},
        "evaluate": {"bn_recalibration_batches": 5, "latency_rounds": 5},
        # the latency budget on the GPU: its table timed with CUDA, batch 64
        "latency": {"device": "cuda", "batch_size": 64, "rounds": 5},
        "prune": {"budget": "latency_target", "latency_target": 0.8},
    },
    "default": {},
}


def run_profile(name: str, overrides: dict, raw: Path, work: Path, device: str) -> dict:
    """Run every stage in `work` with the profile's params on `device`; per-stage seconds and device."""
    cuda = device.startswith("cuda")
    work.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    params = validate_params({**overrides, "runtime": {"device": device}}, f"profile {name}")
    paths = {RAW: raw}
    rows = []
    for stage in STAGES:
        inputs = {k: paths.get(v, work / v) for k, v in stage.inputs.items()}
        outputs = {k: work / v for k, v in stage.outputs.items()}
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        execute(stage, params, inputs, outputs)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() if cuda else 0
        if cuda and stage.runs_model and peak == 0:
            raise SystemExit(f"FAIL: stage {stage.name} allocated no GPU memory: it did not run on CUDA")
        label = (torch.cuda.get_device_name() if cuda else "cpu") if stage.runs_model else "cpu (no model)"
        rows.append({"stage": stage.name, "seconds": seconds, "device": label, "gpu_peak_mib": peak / 2**20})
        print(f"  {name}: {stage.name} {seconds:.1f} s", flush=True)
    return {"rows": rows, **summarize(params, work, rows)}


def summarize(params: Params, work: Path, rows: list[dict]) -> dict:
    """Accuracies from the evaluation; images/s of the teacher's training and the statistics pass."""
    metrics = read_json(work / STAGE_BY_NAME["evaluate"].outputs["metrics"])
    sizes = read_json(work / "data/prepared/meta.json")["sizes"]
    seconds = {r["stage"]: r["seconds"] for r in rows}
    return {
        "teacher_test_acc": metrics["teacher"]["test_acc"],
        "student_test_acc": metrics["student"]["test_acc"],
        "latency_device": metrics["latency_device"],
        # stage wall time: data loading, validation and checkpoints included
        "train_images_per_s": sizes["train"] * params.train_teacher.epochs / seconds["train_teacher"],
        "stats_images_per_s": sizes["train"] / seconds["dump_stats"],
    }


def table(results: dict) -> str:
    profiles = list(results["profiles"])
    head = "| stage | " + " | ".join(f"{p} (s)" for p in profiles) + " | device |"
    lines = [head, "|---|" + "---|" * len(profiles) + "---|"]
    for i, stage in enumerate(STAGES):
        cells = [f"{results['profiles'][p]['rows'][i]['seconds']:.1f}" for p in profiles]
        device = results["profiles"][profiles[0]]["rows"][i]["device"]
        lines.append(f"| {stage.name} | " + " | ".join(cells) + f" | {device} |")
    for key, label, fmt in (
        ("teacher_test_acc", "teacher test acc (%)", lambda v: f"{100 * v:.2f}"),
        ("student_test_acc", "student test acc (%)", lambda v: f"{100 * v:.2f}"),
        ("train_images_per_s", "teacher training images/s", lambda v: f"{v:,.0f}"),
        ("stats_images_per_s", "statistics pass images/s", lambda v: f"{v:,.0f}"),
    ):
        cells = [fmt(results["profiles"][p][key]) for p in profiles]
        lines.append(f"| {label} | " + " | ".join(cells) + " | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu_check.json"))
    parser.add_argument("--raw", type=Path, default=Path("data/raw"))
    parser.add_argument("--profiles", nargs="+", default=list(PROFILES), choices=list(PROFILES))
    parser.add_argument(
        "--device", default="cuda", help="cuda (the check); cpu only to try the script itself"
    )
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit(
            f"FAIL: torch sees no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda})"
        )
    results: dict = {
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or 'x86_64'})",
        "torch": torch.__version__,
        "host": platform.node(),
        "profiles": {},
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cdc-gpu-check-") as tmp:
        for name in args.profiles:
            print(f"profile {name}", flush=True)
            work = Path(tmp) / name
            results["profiles"][name] = run_profile(
                name, PROFILES[name], args.raw.resolve(), work, args.device
            )
    results["total_seconds"] = time.perf_counter() - start
    text = table(results)
    header = f"GPU check, {results['date']}, {results['device']} (torch {results['torch']}), "
    header += f"{results['total_seconds']:.0f} s in all"
    print(header + "\n\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(header + "\n\n" + text + "\n")


if __name__ == "__main__":
    main()
