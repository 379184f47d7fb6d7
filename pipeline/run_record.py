"""What a Kubeflow run records and checks without torch: the MLflow pipeline run of a Kubeflow run (opened
by the first task, closed by the exit task), the tracking settings a task gets from its parameters, and
the check of `raw_uri`. The raw_uri check and the exit task import only this module (with MLflow), so
they start in about a second, not the ten that loading torch takes (pipeline/entry.py).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from components.stages import STAGES
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


def configure_tracking(args: dict[str, Any]) -> None:
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
    configure_tracking(args)
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
