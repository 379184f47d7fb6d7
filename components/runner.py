"""Run one stage on given paths under its MLflow run: the code path shared by `cdc <stage>`,
`dvc repro` and the Kubeflow components."""

from __future__ import annotations

import importlib
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cdc import distributed
from cdc.errors import InputError
from cdc.io import remove
from cdc.params import Params
from components.stages import STAGES, Stage
from components.tracking import RunLog, SilentRunLog, StageTracker, stage_run


def execute(
    stage: Stage,
    params: Params,
    inputs: dict[str, Path],
    outputs: dict[str, Path],
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    run_log: RunLog | None = None,
    **flags: Any,
) -> None:
    """Check the inputs exist, then run `stage` with its params sections logged to MLflow; its
    outputs change only if it succeeds (`staged`).

    The stage body's wall time is logged as `timing.stage_s`: what the process spends besides it
    (start, imports, MLflow, hashing) is the pipeline's overhead (bench/pipeline_overhead.py).
    """
    for name, path in inputs.items():
        if not Path(path).exists():
            raise InputError(
                f"{path}: input {name} of stage {stage.name} not found{_made_by(name, stage)}", path
            )
    section = {k: params.get(k) for k in stage.params}
    logged = {k: (v.model_dump() if hasattr(v, "model_dump") else v) for k, v in section.items()}
    module = importlib.import_module(stage.module)
    if distributed.launched():
        if not stage.distributed:
            names = ", ".join(s.name for s in STAGES if s.distributed)
            raise InputError(f"stage {stage.name} runs as one process; torchrun/--nproc serves {names}")
        tags = {**(tags or {}), "cdc.nproc": os.environ["WORLD_SIZE"]}
    try:
        if distributed.is_follower():
            return _follow(module, params, inputs, outputs, stage, **flags)
        with stage_run(stage.name, logged, inputs, outputs, parent_run_id, tags, run_log) as tracker:
            start = time.perf_counter()
            with staged(outputs, keep=stage.persist) as staging:
                module.run(params, inputs, staging, tracker, **flags)
            tracker.log_metrics({"timing.stage_s": time.perf_counter() - start})
    finally:
        # the stage's process group (torchrun ranks), destroyed as PyTorch asks: a rank that exits with its
        # gloo group alive can abort in the interpreter's teardown ("terminate called without an active
        # exception", seen once in a Kubeflow rank under ATEN_CPU_CAPABILITY=default, 2026-12-02)
        distributed.shutdown()


def _follow(
    module: Any, params: Params, inputs: dict[str, Path], outputs: dict[str, Path], stage: Stage, **flags: Any
) -> None:
    """A rank > 0 under torchrun: compute alongside rank 0 (its share of the data, its gradients), write
    nothing: outputs go to a scratch folder, checkpoints are rank 0's to write (components/checkpoint.py)."""
    with tempfile.TemporaryDirectory(prefix=f"cdc-{stage.name}-rank") as scratch:
        paths = {n: p if n in stage.persist else Path(scratch) / Path(p).name for n, p in outputs.items()}
        module.run(params, inputs, paths, StageTracker(SilentRunLog()), **flags)


@contextmanager
def staged(outputs: dict[str, Path], keep: tuple[str, ...] = ()) -> Iterator[dict[str, Path]]:
    """Hidden sibling paths for the stage to write its outputs to, renamed onto the outputs together
    once it returns: a stage that fails or is killed leaves every declared output as it was (the
    `keep` outputs, resume checkpoints, are written in place)."""
    staging = {
        name: path if name in keep else path.with_name(f".{path.name}.staged")
        for name, path in ((n, Path(p)) for n, p in outputs.items())
    }
    temporary = [staging[name] for name in outputs if name not in keep]
    for tmp in temporary:
        remove(tmp)
    try:
        yield staging
        missing = [str(outputs[name]) for name in outputs if name not in keep and not staging[name].exists()]
        if missing:
            raise RuntimeError(f"the stage did not write its outputs {missing}")
        for name, path in outputs.items():
            if name not in keep:
                path = Path(path)
                path.parent.mkdir(parents=True, exist_ok=True)
                remove(path)
                os.replace(staging[name], path)
    finally:
        for tmp in temporary:
            remove(tmp)


def _made_by(name: str, stage: Stage) -> str:
    """Where a missing input comes from: the stage that writes it by default."""
    default = stage.inputs.get(name)
    for other in STAGES:
        if default in other.outputs.values():
            return f"; it is written by stage {other.name} (`dvc repro {other.name}`)"
    return ""
