"""What every Kubeflow component runs: the stage's own code on the task's artifact paths.

A component's body is one call, `run_component(<stage>, locals())`: its artifacts become the stage's
input and output paths, its parameters the stage's params sections, and the stage runs through
`components.runner.execute` exactly as `cdc <stage>` does. The MLflow run of the stage is nested under
one pipeline run per Kubeflow run, found (or opened by the first task) by the tag `kfp.run_id`, and
closed by the pipeline's exit task (`pipeline.run_record.close_pipeline_run`) with the run's final status.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from cdc.io import read_json
from cdc.params import Params
from components.checkpoint import CHECKPOINT_ROOT_ENV
from components.cli import NPROC_ENV, exit_now, process_count, torchrun
from components.runner import execute
from components.stages import STAGE_BY_NAME, Stage
from pipeline.run_record import (
    CHECKPOINT_ROOT_INPUT,
    POD_NAME_ENV,
    RUN_ID_ENV,
    configure_tracking,
    pipeline_run,
)

log = logging.getLogger("cdc.kfp")


def run_component(stage_name: str, args: dict[str, Any]) -> None:
    """Run stage `stage_name` with the component's arguments (artifacts and parameters by name)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout
    )
    stage = STAGE_BY_NAME[stage_name]
    params = Params.model_validate({section: args[section] for section in stage.sections})
    inputs = {name: Path(args[name].path) for name in stage.inputs}
    outputs = {name: Path(args[name].path) for name in stage.outputs}
    configure_tracking(args)
    if args.get(CHECKPOINT_ROOT_INPUT):
        os.environ[CHECKPOINT_ROOT_ENV] = args[CHECKPOINT_ROOT_INPUT]
    flags = {"embed_files": True} if "embed_files" in stage.flags else {}
    run_id, task = kfp_identity(stage, outputs)
    tags = {"kfp.run_id": run_id, "kfp.task_name": task}
    if os.environ.get(POD_NAME_ENV):
        tags["kfp.pod_name"] = os.environ[POD_NAME_ENV]
    parent = pipeline_run(run_id)
    nproc = processes_for(stage)
    if nproc > 1:
        launch_ranks(stage, params, inputs, outputs, parent, tags, nproc)
    else:
        execute(stage, params, inputs, outputs, parent_run_id=parent, tags=tags, **flags)
    for name, kind in stage.kinds.items():
        if kind == "metrics":
            log_kfp_metrics(args[name], read_json(outputs[name]))
    # KFP's executor writes its output file and the process ends: with torch and MLflow loaded, the
    # interpreter's final collections over their million objects take 1-1.5 s (measured); frozen
    # objects are left to the exit (everything this task wrote is closed by now)
    gc.freeze()


def processes_for(stage: Stage) -> int:
    """One process per GPU of the pod (`cdc kfp compile --gpus`) for the stages that run under torchrun;
    `$CDC_NPROC` overrides (CPU pods, tests)."""
    if not stage.distributed:
        return 1
    import torch

    return process_count(os.environ.get(NPROC_ENV) or str(torch.cuda.device_count() or 1))


def launch_ranks(
    stage: Stage,
    params: Params,
    inputs: dict[str, Path],
    outputs: dict[str, Path],
    parent: str,
    tags: dict[str, str],
    nproc: int,
) -> None:
    """Run the stage as `nproc` processes through torchrun on this pod: a spec file carries the
    component's params, paths and MLflow parent and tags to every rank (`python -m pipeline.entry`)."""
    with tempfile.TemporaryDirectory(prefix="cdc-ranks") as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(
            json.dumps(
                {
                    "stage": stage.name,
                    "params": params.model_dump(),
                    "inputs": {k: str(v) for k, v in inputs.items()},
                    "outputs": {k: str(v) for k, v in outputs.items()},
                    "parent": parent,
                    "tags": tags,
                }
            )
        )
        code = torchrun(nproc, ["pipeline.entry", str(spec)])
        if code != 0:
            raise RuntimeError(f"{stage.name}: torchrun exited with status {code}")


def run_spec(spec_path: Path) -> None:
    """One rank of `launch_ranks`: the stage through `execute` (rank 0 records, the others follow)."""
    spec = json.loads(spec_path.read_text())
    stage = STAGE_BY_NAME[spec["stage"]]
    inputs = {k: Path(v) for k, v in spec["inputs"].items()}
    outputs = {k: Path(v) for k, v in spec["outputs"].items()}
    params = Params.model_validate(spec["params"])
    execute(stage, params, inputs, outputs, parent_run_id=spec["parent"], tags=spec["tags"])


def kfp_identity(stage: Stage, outputs: dict[str, Path]) -> tuple[str, str]:
    """(run id, task name) of this task.

    On a cluster the run id comes from the pod's `pipeline/runid` label; under `kfp.local` from the run
    folder the artifact paths lie in (`<pipeline root>/<run>/<task>/<output>`).
    """
    first = next(iter(outputs.values()))
    run_id = os.environ.get(RUN_ID_ENV) or first.parent.parent.name
    return run_id, stage.name.replace("_", "-")


def log_kfp_metrics(artifact: Any, metrics: dict[str, Any], prefix: str = "") -> None:
    """Every number of a stage's metrics JSON as a Kubeflow metric (nested keys joined by dots)."""
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            log_kfp_metrics(artifact, value, f"{name}.")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            artifact.log_metric(name, float(value))
        else:
            artifact.metadata[name] = value


if __name__ == "__main__":  # a rank launched by `launch_ranks`; ends as a `cdc` command does (exit_now)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_spec(Path(sys.argv[1]))
    exit_now(0)
