"""Stage `train_teacher`: SGD training of the full network with validation every epoch.

The checkpoint of every epoch (model, optimizer, schedule, RNG states) goes to the persistent
`checkpoints` directory; a rerun after a kill resumes from the last one, and SIGTERM checkpoints at
the next step (components/epochs.py). The output model is the final epoch's.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from cdc.data import load_prepared
from cdc.images import file_md5
from cdc.io import load_initial_weights, save_model, write_json
from cdc.models import build_model
from cdc.params import Params
from cdc.train import EpochResult, sgd, warmup_cosine
from components.checkpoint import Checkpoints, fingerprint
from components.epochs import EpochLoop
from components.history import record_epoch, write_history
from components.runtime import parallel, stage_runtime
from components.tracking import StageTracker

log = logging.getLogger(__name__)


def run(
    params: Params,
    inputs: dict[str, Path],
    outputs: dict[str, Path],
    tracker: StageTracker,
    restart: bool = False,
    sync_bn: bool = False,
) -> None:
    p = params.train_teacher
    runtime = stage_runtime(params, tracker)
    data = load_prepared(inputs["prepared"], params.data.workers)
    torch.manual_seed(params.seed)
    model = build_model(p.arch, data.num_classes, data.input_shape[0])
    if p.init_checkpoint:
        fresh = load_initial_weights(model, p.init_checkpoint)
        tracker.set_tags({"cdc.init_checkpoint.md5": file_md5(Path(p.init_checkpoint))})
        log.info("initial weights from %s%s", p.init_checkpoint, f"; new head {fresh}" if fresh else "")
    model.to(runtime.device)
    train = data.training_batches(p.batch_size, params.seed, runtime.device, p.augment, p.hflip)
    val = data.batches("val", 512, device=runtime.device)
    optimizer = sgd(model, p.lr, p.momentum, p.weight_decay)
    scheduler = warmup_cosine(optimizer, p.epochs * len(train), int(p.warmup_epochs * len(train)))

    checkpoints = Checkpoints(outputs["checkpoints"], fingerprint("train_teacher", params, inputs), restart)
    lr_hint = f"train_teacher.lr (now {p.lr})"
    loop = EpochLoop("train_teacher", model, optimizer, scheduler, train, val, checkpoints, runtime, lr_hint)
    state = checkpoints.resume()
    if state is not None:
        loop.restore(state)

    def after_epoch(epoch: int, tr: EpochResult, va: EpochResult) -> None:
        lr = optimizer.param_groups[0]["lr"]
        record_epoch(loop.history, tracker, "teacher", epoch + 1, p.epochs, tr, va, lr=lr)

    loop.run(parallel(model, runtime, sync_bn), p.epochs, "teacher", after_epoch)
    history = loop.history
    save_model(outputs["model"], model, p.arch, data.num_classes, data.input_shape[0])
    write_history(outputs["history"], history)
    write_json(outputs["metrics"], {"val_acc": history[-1]["val_acc"], "val_loss": history[-1]["val_loss"]})
    checkpoints.finish()
