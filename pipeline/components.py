"""One Kubeflow component per stage of `components/stages/__init__.py`, built from the stage list.

Each is a lightweight Python component (so `kfp.local`'s subprocess runner can run it) whose body
hands its arguments to `pipeline.entry.run_component`. KFP builds a component from a function's
source and signature, so the function is written out from the stage: its inputs and outputs as typed
artifacts (the kind the stage list gives each output), its params sections and the tracking settings
as parameters. The source is registered with `linecache` so that `inspect.getsource` (which KFP uses
to embed the function in the task's command) finds it.
"""

from __future__ import annotations

import linecache
from typing import get_origin

from kfp import dsl
from kfp.dsl import python_component
from pydantic import BaseModel

from cdc.params import Params
from components.stages import RAW, STAGES, Stage
from pipeline.run_record import CHECKPOINT_ROOT_INPUT, TRACKING_INPUTS

# stage-list artifact kind -> KFP artifact class
ARTIFACT_TYPES: dict[str, type[dsl.Artifact]] = {
    "dataset": dsl.Dataset,
    "model": dsl.Model,
    "metrics": dsl.Metrics,
    "markdown": dsl.Markdown,
    "artifact": dsl.Artifact,
}
RAW_KIND = "dataset"
RECORD = "pipeline.run_record"  # what the raw_uri check and the exit task import: no torch


def output_kinds() -> dict[str, str]:
    """Default path of every artifact in the DAG -> its kind (the raw data is a dataset)."""
    kinds = {RAW: RAW_KIND}
    for stage in STAGES:
        kinds.update({stage.outputs[name]: kind for name, kind in stage.kinds.items()})
    return kinds


def section_type(section: str) -> str:
    """The KFP parameter type of a params.yaml section: a struct (dict) or a scalar like `seed`."""
    annotation = Params.model_fields[section].annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "dict"
    assert get_origin(annotation) is None and annotation is not None, section
    return annotation.__name__


def component_source(stage: Stage) -> str:
    """The Python source of the component function of `stage`."""
    kinds = output_kinds()
    args = [f"{n}: Input[{ARTIFACT_TYPES[kinds[p]].__name__}]" for n, p in stage.inputs.items()]
    args += [f"{n}: Output[{ARTIFACT_TYPES[k].__name__}]" for n, k in stage.kinds.items()]
    args += [f"{section}: {section_type(section)}" for section in stage.sections]
    args += [f'{name}: str = ""' for name in TRACKING_INPUTS]
    if stage.persist:  # resume checkpoints mirrored to durable storage (pipeline/entry.py)
        args.append(f'{CHECKPOINT_ROOT_INPUT}: str = ""')
    call = f"run_component({stage.name!r}, arguments)"
    return _function_source(stage.name, args, stage.help, "pipeline.entry", call)


def _function_source(name: str, args: list[str], doc: str, module: str, call: str) -> str:
    """A component function whose body calls `call`, imported from `module` inside the pod."""
    signature = "".join(f"    {a},\n" for a in args)
    function = call.partition("(")[0]
    return (
        f"def {name}(\n{signature}):\n"
        f'    """{doc}"""\n'
        "    arguments = dict(locals())\n"
        f"    from {module} import {function}\n\n"
        f"    {call}\n"
    )


def _component(name: str, source: str, image: str) -> python_component.PythonComponent:
    filename = f"<cdc kfp component {name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict = {"__name__": __name__, "Input": dsl.Input, "Output": dsl.Output, "dsl": dsl}
    namespace.update({cls.__name__: cls for cls in ARTIFACT_TYPES.values()})
    # dont_inherit: real annotations, not the strings this module's `from __future__` would make them
    exec(compile(source, filename, "exec", dont_inherit=True), namespace)
    return dsl.component(namespace[name], base_image=image, install_kfp_package=False)


def build_component(stage: Stage, image: str) -> python_component.PythonComponent:
    """The lightweight component of `stage`, running in `image` (which has the project installed)."""
    return _component(stage.name, component_source(stage), image)


def check_raw_uri_component(image: str) -> python_component.PythonComponent:
    """The first task: stops a run whose `raw_uri` is empty or not a URI, naming the parameter (the
    importer after it would fail with the backend's own, obscure message)."""
    doc = "Check the raw_uri pipeline parameter."
    source = _function_source("check_raw_uri", ["raw_uri: str"], doc, RECORD, "check_raw_uri(raw_uri)")
    return _component("check_raw_uri", source, image)


def close_run_component(image: str) -> python_component.PythonComponent:
    """The exit task: closes the MLflow pipeline run with the run's final status, whatever happened."""
    args = ["status: dsl.PipelineTaskFinalStatus", *(f'{name}: str = ""' for name in TRACKING_INPUTS)]
    call = "close_pipeline_run(status, arguments)"
    source = _function_source("close_mlflow_run", args, "Close the MLflow pipeline run.", RECORD, call)
    return _component("close_mlflow_run", source, image)
