"""What every Kubeflow component runs: the stage's own code on the task's artifact paths.

A component's body is one call, `run_component(<stage>, locals())`: its artifacts become the stage's
input and output paths, its parameters the stage's params sections, and the stage runs through
`components.runner.execute` exactly as `cdc <stage>` does. The MLflow run of the stage is nested under
one pipeline run per Kubeflow run, found (or opened by the first task) by the tag `kfp.run_id`, and
closed by the pipeline's exit task (`close_pipeline_run`) with the run's final status.
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
from components.cli import NPROC_ENV, exit_now, torchrun
from components.runner import execute
from components.stages import STAGE_BY_NAME, STAGES, Stage
from components.tracking import git_commit, setup_mlflow

log = logging.getLogger("cdc.kfp")

# Set on cluster pods from their metadata (pipeline/dag.py); `cdc kfp run-local` sets KFP_RUN_ID itself.
RUN_ID_ENV = "KFP_RUN_ID"
POD_NAME_ENV = "KFP_POD_NAME"
# component parameter -> the environment variable it sets for the stage code (empty: leave the pod's)
TRACKING_ENV = {
    "mlflow_tracking_uri": "MLFLOW_TRACKING_URI",
    "mlflow_experiment": "CDC_EXPERIMENT",
    "s3_endpoint_url": "MLFLOW_S3_ENDPOINT_URL",
}
TRACKING_INPUTS = tuple(TRACKING_ENV)
# component parameter of the training stages: where their resume checkpoints are mirrored (durable
# storage every pod reaches: s3://..., a PVC path), read by components/checkpoint.py from the env
CHECKPOINT_ROOT_INPUT = "checkpoint_root"
# MLflow status of the pipeline run from the Kubeflow run's final state (anything else: FAILED)
FINAL_STATUS = {"SUCCEEDED": "FINISHED", "CANCELED": "KILLED", "CANCELLED": "KILLED", "CANCELING": "KILLED"}


def run_component(stage_name: str, args: dict[str, Any]) -> None:
    """Run stage `stage_name` with the component's arguments (artifacts and parameters by name)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout
    )
    stage = STAGE_BY_NAME[stage_name]
    params = Params.model_validate({section: args[section] for section in stage.params})
    inputs = {name: Path(args[name].path) for name in stage.inputs}
    outputs = {name: Path(args[name].path) for name in stage.outputs}
    _configure_tracking(args)
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

    return int(os.environ.get(NPROC_ENV) or torch.cuda.device_count() or 1)


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


def _configure_tracking(args: dict[str, Any]) -> None:
    """Pipeline parameters override the pod's environment; empty strings leave it as it is."""
    for name, env in TRACKING_ENV.items():
        if args.get(name):
            os.environ[env] = args[name]
    if args.get("s3_endpoint_url"):  # boto3's own variable: the checkpoint mirror (s3fs) reads it too
        os.environ["AWS_ENDPOINT_URL"] = args["s3_endpoint_url"]
    if os.environ.get(POD_NAME_ENV) and not os.environ.get("MLFLOW_TRACKING_URI"):
        log.warning(
            "no MLflow tracking URI (pipeline parameter mlflow_tracking_uri): this task's MLflow run "
            "goes to a SQLite file inside the pod and is lost with it"
        )


def kfp_identity(stage: Stage, outputs: dict[str, Path]) -> tuple[str, str]:
    """(run id, task name) of this task.

    On a cluster the run id comes from the pod's `pipeline/runid` label; under `kfp.local` from the run
    folder the artifact paths lie in (`<pipeline root>/<run>/<task>/<output>`).
    """
    first = next(iter(outputs.values()))
    run_id = os.environ.get(RUN_ID_ENV) or first.parent.parent.name
    return run_id, stage.name.replace("_", "-")


def pipeline_run(kfp_run_id: str) -> str:
    """The MLflow run id of the pipeline run tagged with this Kubeflow run id, opened when missing."""
    mlflow = setup_mlflow()
    client = mlflow.MlflowClient()
    experiment = mlflow.get_experiment_by_name(os.environ.get("CDC_EXPERIMENT", "cdc"))
    found = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`kfp.run_id` = '{kfp_run_id}' and tags.`cdc.stage` = 'pipeline'",
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(
        experiment.experiment_id,
        run_name="pipeline",
        tags={"cdc.stage": "pipeline", "kfp.run_id": kfp_run_id, "mlflow.source.git.commit": git_commit()},
    )
    log.info("opened MLflow pipeline run %s for Kubeflow run %s", run.info.run_id, kfp_run_id)
    return run.info.run_id


def check_raw_uri(raw_uri: str) -> None:
    """Stop the run, in one line naming the parameter, when `raw_uri` cannot be imported."""
    hint = "give the raw dataset's location, e.g. s3://bucket/cdc/raw (cdc kfp submit --raw-uri)"
    if not raw_uri.strip():
        raise SystemExit(f"cdc: the pipeline parameter raw_uri is empty: {hint}")
    if "://" not in raw_uri and not (Path(raw_uri).is_absolute() and Path(raw_uri).exists()):
        raise SystemExit(
            f"cdc: the pipeline parameter raw_uri {raw_uri!r} is not a URI (a local path serves kfp.local "
            f"only, where it must exist): {hint}"
        )


def close_pipeline_run(status: Any, args: dict[str, Any]) -> None:
    """The exit task: end the MLflow pipeline run of this Kubeflow run with its final state, and tag
    which stages ran here and which did not (served from Kubeflow's cache, or never reached)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _configure_tracking(args)
    run_id = os.environ.get(RUN_ID_ENV) or status.pipeline_job_resource_name
    parent = pipeline_run(run_id)
    client = setup_mlflow().MlflowClient()
    experiment = client.get_run(parent).info.experiment_id
    children = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    ran = sorted({c.data.tags.get("cdc.stage", "") for c in children} - {""})
    missing = [s.name for s in STAGES if s.name not in ran]
    final = FINAL_STATUS.get(str(status.state).upper(), "FAILED")
    client.set_tag(parent, "kfp.state", str(status.state))
    client.set_tag(parent, "kfp.tasks_ran", ",".join(ran))
    # after a success every stage without a run here was served from Kubeflow's cache
    client.set_tag(
        parent, "kfp.tasks_cached" if final == "FINISHED" else "kfp.tasks_not_run", ",".join(missing)
    )
    if status.error_message:
        client.set_tag(parent, "kfp.error", str(status.error_message)[:500])
    client.set_terminated(parent, final)
    log.info("MLflow pipeline run %s of Kubeflow run %s closed %s (%s)", parent, run_id, final, status.state)


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
