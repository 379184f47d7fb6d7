"""The runtime (device, mixed precision) of a model-running stage, resolved once and recorded."""

from __future__ import annotations

import dataclasses
import logging
import os

import torch

from cdc import distributed
from cdc.device import Runtime, make_runtime
from cdc.errors import InputError
from cdc.params import Params
from components.tracking import StageTracker

log = logging.getLogger(__name__)


def stage_runtime(params: Params, tracker: StageTracker) -> Runtime:
    """Resolve `runtime.device` on this machine, log it and tag the stage's MLflow run with it."""
    runtime = make_runtime(**params.runtime.model_dump())
    if distributed.launched():  # torchrun: one process per GPU, each on its own
        if runtime.is_cuda:
            runtime = dataclasses.replace(runtime, device=torch.device("cuda", int(os.environ["LOCAL_RANK"])))
        group = distributed.init(runtime.device)
        log.info("rank %d of %d", group.rank, group.world)
    log.info("running on %s", runtime.describe())
    tracker.set_tags({"cdc.device": runtime.describe()})
    return runtime


def parallel(model: torch.nn.Module, runtime: Runtime, sync_bn: bool) -> torch.nn.Module:
    """The module a training step runs: `model` itself, or under torchrun `model` wrapped in
    DistributedDataParallel (gradients averaged over the ranks), with SyncBatchNorm if asked."""
    if not distributed.current().active:
        if sync_bn:
            log.warning("--sync-bn applies with several processes (--nproc) only")
        return model
    if sync_bn:
        if not runtime.is_cuda:
            raise InputError("--sync-bn needs CUDA processes: PyTorch's SyncBatchNorm runs on GPUs only")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [runtime.device.index] if runtime.is_cuda else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
