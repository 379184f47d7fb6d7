"""Run the Kubeflow pipeline on this machine with `kfp.local` (subprocess runner, current environment)."""

from __future__ import annotations

import logging
import os
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdc.params import Params
from components.tracking import tracking_uri
from pipeline.dag import build_pipeline
from pipeline.defaults import PIPELINE_NAME
from pipeline.pods import PodSettings
from pipeline.run_record import RUN_ID_ENV, pipeline_run

log = logging.getLogger("cdc.kfp")


@dataclass
class LocalRun:
    run_id: str  # the `kfp.run_id` tag of the MLflow pipeline run
    root: Path  # <pipeline root>/<run folder>: one folder per task with its artifacts
    mlflow_run_id: str
    seconds: float


def run_local(
    params: Params,
    raw: Path,
    pipeline_root: Path,
    arguments: dict[str, Any] | None = None,
    cache: bool = False,
) -> LocalRun:
    """Run every component as a subprocess of this interpreter; artifacts land under `pipeline_root`.

    The MLflow pipeline run is opened here (so it exists even when a task fails first) and found by
    every task and the exit task through the `KFP_RUN_ID` this process passes down.
    """
    from kfp import local

    pipeline_root = pipeline_root.resolve()
    before = set(pipeline_root.iterdir()) if pipeline_root.exists() else set()
    run_id = f"local-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    os.environ[RUN_ID_ENV] = run_id
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri()
    mlflow_run = pipeline_run(run_id)
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(pipeline_root),
        enable_caching=cache,
        raise_on_error=True,
    )
    args: dict[str, Any] = {"raw_uri": str(raw.resolve()), "mlflow_tracking_uri": tracking_uri()}
    args.update(arguments or {})
    start = time.perf_counter()
    with warnings.catch_warnings():
        # The local runner ignores resources, retries and Kubernetes settings and says so per task.
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
        warnings.filterwarnings("ignore", message=".*custom or non-Python base image.*")
        # no retries here: a failed task is reported at once, and a rerun resumes its checkpoints
        build_pipeline(params, PodSettings(retries=0))(**args)
    seconds = time.perf_counter() - start
    new = sorted(p for p in pipeline_root.iterdir() if p not in before and p.name.startswith(PIPELINE_NAME))
    if not new:
        raise RuntimeError(f"kfp.local wrote no run folder under {pipeline_root}")
    return LocalRun(run_id, new[-1], mlflow_run, seconds)
