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
from pipeline.entry import TRACKING_INPUTS

# stage-list artifact kind -> KFP artifact class
ARTIFACT_TYPES: dict[str, type[dsl.Artifact]] = {
    "dataset": dsl.Dataset,
    "model": dsl.Model,
    "metrics": dsl.Metrics,
    "markdown": dsl.Markdown,
    "artifact": dsl.Artifact,
}
RAW_KIND = "dataset"


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
    args += [f"{section}: {section_type(section)}" for section in stage.params]
    args += [f'{name}: str = ""' for name in TRACKING_INPUTS]
    signature = "".join(f"    {a},\n" for a in args)
    return (
        f"def {stage.name}(\n{signature}):\n"
        f'    """{stage.help}"""\n'
        "    arguments = dict(locals())\n"
        "    from pipeline.entry import run_component\n\n"
        f"    run_component({stage.name!r}, arguments)\n"
    )


def build_component(stage: Stage, image: str) -> python_component.PythonComponent:
    """The lightweight component of `stage`, running in `image` (which has the project installed)."""
    source = component_source(stage)
    filename = f"<cdc kfp component {stage.name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict = {"__name__": __name__, "Input": dsl.Input, "Output": dsl.Output}
    namespace.update({cls.__name__: cls for cls in ARTIFACT_TYPES.values()})
    # dont_inherit: real annotations, not the strings this module's `from __future__` would make them
    exec(compile(source, filename, "exec", dont_inherit=True), namespace)
    return dsl.component(namespace[stage.name], base_image=image, install_kfp_package=False)
