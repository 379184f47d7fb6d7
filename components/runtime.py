"""The runtime (device, mixed precision) of a model-running stage, resolved once and recorded."""

from __future__ import annotations

import logging

from cdc.device import Runtime, make_runtime
from cdc.params import Params
from components.tracking import StageTracker

log = logging.getLogger(__name__)


def stage_runtime(params: Params, tracker: StageTracker) -> Runtime:
    """Resolve `runtime.device` on this machine, log it and tag the stage's MLflow run with it."""
    runtime = make_runtime(**params.runtime.model_dump())
    log.info("running on %s", runtime.describe())
    tracker.set_tags({"cdc.device": runtime.describe()})
    return runtime
