"""Run one stage on given paths under its MLflow run: the code path shared by `cdc <stage>`,
`dvc repro` and the Kubeflow components."""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from typing import Any

from cdc.params import Params
from components.stages import Stage
from components.tracking import stage_run


def execute(
    stage: Stage,
    params: Params,
    inputs: dict[str, Path],
    outputs: dict[str, Path],
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    **flags: Any,
) -> None:
    """Check the inputs exist, then run `stage` with its params sections logged to MLflow.

    The stage body's wall time is logged as `timing.stage_s`: what the process spends besides it
    (start, imports, MLflow, hashing) is the pipeline's overhead (bench/pipeline_overhead.py).
    """
    for name, path in inputs.items():
        if not Path(path).exists():
            raise FileNotFoundError(f"input {name} of stage {stage.name} not found: {path}")
    section = {k: getattr(params, k) for k in stage.params}
    logged = {k: (v.model_dump() if hasattr(v, "model_dump") else v) for k, v in section.items()}
    module = importlib.import_module(stage.module)
    with stage_run(stage.name, logged, inputs, outputs, parent_run_id, tags) as tracker:
        start = time.perf_counter()
        module.run(params, inputs, outputs, tracker, **flags)
        tracker.log_metrics({"timing.stage_s": time.perf_counter() - start})
