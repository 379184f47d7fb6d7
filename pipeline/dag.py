"""The Kubeflow Pipelines v2 pipeline: the stages of `components/stages/__init__.py` wired by their paths.

An input of a stage is connected to the task whose output has the same default path, exactly as
`dvc.yaml` connects a dependency to the stage that declares it as an output; the raw data enters
through an importer from `raw_uri`, after a check that it was given. Pipeline parameters: one per
params.yaml section (defaults from the params file at compile time, overridable per run), the raw data
URI, the MLflow settings, the durable checkpoint root and the name of the Kubernetes secret with S3
credentials. How the pods are placed and sized (GPUs, tolerations, node selectors, /dev/shm, timeouts,
image) is fixed at compile time (`PodSettings`): requests and limits are computed from the GPU count.
Every task runs inside a `dsl.ExitHandler` whose exit task closes the MLflow pipeline run.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path
from typing import Any

from kfp import compiler, dsl, kubernetes
from kfp.dsl import base_component

from cdc.params import Params, load_params
from components.stages import RAW, STAGES, Stage
from pipeline.components import build_component, check_raw_uri_component, close_run_component, section_type
from pipeline.defaults import COMPILED, PIPELINE_NAME
from pipeline.pods import PodSettings
from pipeline.run_record import CHECKPOINT_ROOT_INPUT, POD_NAME_ENV, RUN_ID_ENV, TRACKING_INPUTS

S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
SHM_VOLUME = "dshm"


def pipeline_parameters(params: Params) -> list[inspect.Parameter]:
    """The pipeline's parameters, in order, with their defaults."""
    kw = inspect.Parameter.POSITIONAL_OR_KEYWORD
    # no default: a run started from the UI without it stops at the first task, naming raw_uri
    out = [inspect.Parameter("raw_uri", kw, annotation=str, default="")]
    for section in Params.model_fields:
        value = getattr(params, section)
        # KFP structs cannot hold null: a null key is left out and the schema fills in its default
        default = value.model_dump(exclude_none=True) if hasattr(value, "model_dump") else value
        annotation = dict if section_type(section) == "dict" else type(default)
        out.append(inspect.Parameter(section, kw, annotation=annotation, default=default))
    out += [inspect.Parameter(name, kw, annotation=str, default="") for name in TRACKING_INPUTS]
    out += [
        inspect.Parameter(CHECKPOINT_ROOT_INPUT, kw, annotation=str, default=""),
        inspect.Parameter("s3_credentials_secret", kw, annotation=str, default="cdc-s3-credentials"),
    ]
    return out


def build_pipeline(
    params: Params | None = None, pods: PodSettings | None = None
) -> base_component.BaseComponent:
    """The pipeline with `params` (default: the schema's, equal to the committed params.yaml) as defaults."""
    params, pods = params or Params(), pods or PodSettings()
    component_of = {stage.name: build_component(stage, pods.image) for stage in STAGES}
    check_raw_uri, close_run = check_raw_uri_component(pods.image), close_run_component(pods.image)
    signature = inspect.Signature(pipeline_parameters(params))

    def cdc_pipeline(*channels: Any) -> None:
        arg = dict(zip(signature.parameters, channels, strict=True))
        tracking = {name: arg[name] for name in TRACKING_INPUTS}
        exit_task = close_run(**tracking)
        configure_task(exit_task, None, pods, arg["s3_credentials_secret"])
        exit_task.set_display_name("close MLflow run")
        with dsl.ExitHandler(exit_task, name="cdc"):
            check = check_raw_uri(raw_uri=arg["raw_uri"])
            configure_task(check, None, pods, arg["s3_credentials_secret"])
            check.set_display_name("check raw_uri")
            raw = dsl.importer(artifact_uri=arg["raw_uri"], artifact_class=dsl.Dataset, reimport=False)
            raw.set_display_name("raw data").after(check)
            produced = {RAW: raw.output}
            for stage in STAGES:
                kwargs = {name: produced[path] for name, path in stage.inputs.items()}
                kwargs.update({section: arg[section] for section in stage.sections})
                kwargs.update(tracking)
                if stage.persist:
                    kwargs[CHECKPOINT_ROOT_INPUT] = arg[CHECKPOINT_ROOT_INPUT]
                task = component_of[stage.name](**kwargs)
                configure_task(task, stage, pods, arg["s3_credentials_secret"], params)
                produced.update({path: task.outputs[name] for name, path in stage.outputs.items()})

    cdc_pipeline.__signature__ = signature  # type: ignore[attr-defined]
    cdc_pipeline.__doc__ = (
        "Class-Discriminative Compression: "
        + " -> ".join(s.name for s in STAGES)
        + ". Parameters: one per params.yaml section, plus data, tracking and GPU settings."
    )
    return dsl.pipeline(name=PIPELINE_NAME)(cdc_pipeline)


def configure_task(
    task: dsl.PipelineTask,
    stage: Stage | None,
    pods: PodSettings,
    s3_secret: Any,
    params: Params | None = None,
) -> None:
    """Resources, placement, retries, caching and the environment a task gets on the cluster
    (`stage` None: a task that runs no stage, the raw_uri check or the exit task: never cached)."""
    gpus = pods.gpus_of(stage, params.get if params else None) if stage else 0
    if gpus:
        cpu, memory = pods.cpu_per_gpu * gpus, pods.memory_gb_per_gpu * gpus + pods.shm_gb
        task.set_accelerator_type(pods.accelerator).set_accelerator_limit(gpus)
        # memory-backed /dev/shm: NCCL and DataLoader workers exchange tensors there (64 MiB by default)
        kubernetes.empty_dir_mount(
            task, SHM_VOLUME, "/dev/shm", medium="Memory", size_limit=f"{pods.shm_gb}Gi"
        )
        for toleration in pods.tolerations:
            kubernetes.add_toleration(
                task,
                key=toleration.key,
                operator="Equal" if toleration.value is not None else "Exists",
                value=toleration.value,
                effect=toleration.effect,  # type: ignore[arg-type]
            )
        for label, value in pods.node_selector:
            kubernetes.add_node_selector(task, label, value)
    else:
        cpu, memory = pods.cpu_task
    task.set_cpu_request(str(cpu)).set_cpu_limit(str(cpu))
    task.set_memory_request(f"{memory}Gi").set_memory_limit(f"{memory}Gi")
    hours = pods.gpu_timeout_h if gpus else pods.cpu_timeout_h
    kubernetes.set_timeout(task, int(hours * 3600))
    if pods.image_pull_secret:
        kubernetes.set_image_pull_secrets(task, [pods.image_pull_secret])
    if stage is not None:
        if pods.retries:
            task.set_retry(pods.retries, f"{pods.retry_backoff_s}s", backoff_factor=2.0)
        task.set_caching_options(True)
    else:
        task.set_caching_options(False)
    # The run id and pod name from the pod's own metadata: not inputs, so the cache keys stay stable.
    kubernetes.use_field_path_as_env(task, RUN_ID_ENV, "metadata.labels['pipeline/runid']")
    kubernetes.use_field_path_as_env(task, POD_NAME_ENV, "metadata.name")
    # S3 credentials (MLflow artifacts) from a Kubernetes secret, never from the pipeline spec.
    kubernetes.use_secret_as_env(task, s3_secret, {k: k for k in S3_SECRET_KEYS}, optional=True)


def compile_pipeline(
    path: Path = COMPILED, params_path: Path | None = None, pods: PodSettings | None = None
) -> Path:
    """Write the pipeline spec YAML (defaults from `params_path`, or the schema's defaults)."""
    params = load_params(params_path) if params_path else Params()
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(params, pods), str(path))
    path.write_text(_sorted_header_defaults(path.read_text()))
    return path


def _sorted_header_defaults(text: str) -> str:
    """KFP's comment header lists struct defaults in hash order; sort them so recompiling is a no-op."""

    def sort(match: re.Match) -> str:
        value = ast.literal_eval(match.group(2))
        return f"{match.group(1)}{dict(sorted(value.items()))!r}]"

    return re.sub(r"^(#\s+\w+: dict \[Default: )(\{.*\})\]$", sort, text, flags=re.MULTILINE)
