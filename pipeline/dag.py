"""The Kubeflow Pipelines v2 pipeline: the stages of `components/stages/__init__.py` wired by their paths.

An input of a stage is connected to the task whose output has the same default path, exactly as
`dvc.yaml` connects a dependency to the stage that declares it as an output; the raw data enters
through an importer from `raw_uri`. Pipeline parameters: one per params.yaml section (defaults from
the params file at compile time, overridable per run), the raw data URI, the MLflow settings, the
GPU count and the name of the Kubernetes secret with S3 credentials.
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
from components.stages import RAW, STAGES
from pipeline.components import build_component, section_type
from pipeline.defaults import COMPILED, DEFAULT_IMAGE, PIPELINE_NAME
from pipeline.entry import POD_NAME_ENV, RUN_ID_ENV, TRACKING_INPUTS

GPU_RESOURCE = "nvidia.com/gpu"
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


# Requests per task: model-running stages get a GPU (count: the `gpu_count` parameter), the rest CPU.
RESOURCES = {True: {"cpu": "4", "memory": "16G"}, False: {"cpu": "1", "memory": "4G"}}
RETRIES = {"num_retries": 2, "backoff_duration": "60s", "backoff_factor": 2.0}


def pipeline_parameters(params: Params) -> list[inspect.Parameter]:
    """The pipeline's parameters, in order, with their defaults."""
    kw = inspect.Parameter.POSITIONAL_OR_KEYWORD
    out = [inspect.Parameter("raw_uri", kw, annotation=str, default=RAW)]
    for section in Params.model_fields:
        value = getattr(params, section)
        # KFP structs cannot hold null: a null key is left out and the schema fills in its default
        default = value.model_dump(exclude_none=True) if hasattr(value, "model_dump") else value
        annotation = dict if section_type(section) == "dict" else type(default)
        out.append(inspect.Parameter(section, kw, annotation=annotation, default=default))
    out += [inspect.Parameter(name, kw, annotation=str, default="") for name in TRACKING_INPUTS]
    out += [
        inspect.Parameter("gpu_count", kw, annotation=int, default=1),
        inspect.Parameter("s3_credentials_secret", kw, annotation=str, default="cdc-s3-credentials"),
    ]
    return out


def build_pipeline(params: Params | None = None, image: str = DEFAULT_IMAGE) -> base_component.BaseComponent:
    """The pipeline with `params` (default: the schema's, equal to the committed params.yaml) as defaults."""
    params = params or Params()
    component_of = {stage.name: build_component(stage, image) for stage in STAGES}
    signature = inspect.Signature(pipeline_parameters(params))

    def cdc_pipeline(*channels: Any) -> None:
        arg = dict(zip(signature.parameters, channels, strict=True))
        raw = dsl.importer(artifact_uri=arg["raw_uri"], artifact_class=dsl.Dataset, reimport=False)
        raw.set_display_name("raw data")
        produced = {RAW: raw.output}
        for stage in STAGES:
            kwargs = {name: produced[path] for name, path in stage.inputs.items()}
            kwargs.update({section: arg[section] for section in stage.params})
            kwargs.update({name: arg[name] for name in TRACKING_INPUTS})
            task = component_of[stage.name](**kwargs)
            configure_task(task, stage.runs_model, arg["gpu_count"], arg["s3_credentials_secret"])
            produced.update({path: task.outputs[name] for name, path in stage.outputs.items()})

    cdc_pipeline.__signature__ = signature  # type: ignore[attr-defined]
    cdc_pipeline.__doc__ = (
        "Class-Discriminative Compression: "
        + " -> ".join(s.name for s in STAGES)
        + ". Parameters: one per params.yaml section, plus data, tracking and GPU settings."
    )
    return dsl.pipeline(name=PIPELINE_NAME)(cdc_pipeline)


def configure_task(task: dsl.PipelineTask, gpu: bool, gpu_count: Any, s3_secret: Any) -> None:
    """Resources, retries, caching and the environment a task gets on the cluster."""
    task.set_cpu_request(RESOURCES[gpu]["cpu"]).set_memory_request(RESOURCES[gpu]["memory"])
    if gpu:
        task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(gpu_count)
    task.set_retry(**RETRIES)  # type: ignore[arg-type]
    task.set_caching_options(True)
    # The run id and pod name from the pod's own metadata: not inputs, so the cache keys stay stable.
    kubernetes.use_field_path_as_env(task, RUN_ID_ENV, "metadata.labels['pipeline/runid']")
    kubernetes.use_field_path_as_env(task, POD_NAME_ENV, "metadata.name")
    # S3 credentials (MLflow artifacts) from a Kubernetes secret, never from the pipeline spec.
    kubernetes.use_secret_as_env(task, s3_secret, {k: k for k in S3_SECRET_KEYS}, optional=True)


def compile_pipeline(
    path: Path = COMPILED, params_path: Path | None = None, image: str = DEFAULT_IMAGE
) -> Path:
    """Write the pipeline spec YAML (defaults from `params_path`, or the schema's defaults)."""
    params = load_params(params_path) if params_path else Params()
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(params, image), str(path))
    path.write_text(_sorted_header_defaults(path.read_text()))
    return path


def _sorted_header_defaults(text: str) -> str:
    """KFP's comment header lists struct defaults in hash order; sort them so recompiling is a no-op."""

    def sort(match: re.Match) -> str:
        value = ast.literal_eval(match.group(2))
        return f"{match.group(1)}{dict(sorted(value.items()))!r}]"

    return re.sub(r"^(#\s+\w+: dict \[Default: )(\{.*\})\]$", sort, text, flags=re.MULTILINE)
