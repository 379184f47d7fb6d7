"""Stage `train_teacher`: SGD training of the full network with validation every epoch.

With `epochs: 0` the `init_checkpoint` is the teacher as it is: loaded, checked against the dataset and
measured on the validation split, never trained (a trained model loses accuracy to a fresh schedule).
The checkpoint of every epoch (model, optimizer, schedule, RNG states) goes to the persistent
`checkpoints` directory; a rerun after a kill resumes from the last one, and SIGTERM checkpoints at
the next step (components/epochs.py). The output model is the final epoch's.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from cdc.data import Prepared, load_prepared
from cdc.errors import InputError
from cdc.images import file_md5
from cdc.io import load_initial_weights, save_model, write_json
from cdc.models import PrunableNet, build_model
from cdc.params import Params, imported_arch
from cdc.train import BatchIterable, EpochResult, evaluate, sgd, warmup_cosine
from components.checkpoint import Checkpoints
from components.epochs import EpochLoop
from components.history import record_epoch, write_history
from components.runtime import parallel, stage_runtime
from components.stages import USER_MODELS
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
    imported = imported_arch(params, data.input_shape)
    model = build_model(p.arch, data.num_classes, data.input_shape[0], imported=imported)
    if p.init_checkpoint:
        fresh = load_initial_weights(model, p.init_checkpoint)
        tracker.set_tags({"cdc.init_checkpoint.md5": file_md5(Path(p.init_checkpoint))})
        log.info("initial weights from %s%s", p.init_checkpoint, f"; new head {fresh}" if fresh else "")
        if not Path(p.init_checkpoint).resolve().is_relative_to(Path(USER_MODELS).resolve()):
            log.warning(
                "%s is outside %s/, which dvc.yaml tracks: a new checkpoint there reruns nothing",
                p.init_checkpoint,
                USER_MODELS,
            )
        if fresh and p.epochs == 0:
            raise InputError(
                f"{p.init_checkpoint}: its classifier ({fresh}) does not fit the {data.num_classes} classes "
                "of the dataset; a teacher imported as it is (train_teacher.epochs 0) needs its own head",
                p.init_checkpoint,
            )
    model.to(runtime.device)
    val = data.batches("val", 512, device=runtime.device)
    if p.epochs == 0:
        return import_as_is(model, p.arch, data, val, outputs, tracker)
    train = data.training_batches(p.batch_size, params.seed, runtime.device, p.augment, p.hflip)
    optimizer = sgd(model, p.lr, p.momentum, p.weight_decay)
    scheduler = warmup_cosine(optimizer, p.epochs * len(train), int(p.warmup_epochs * len(train)))

    checkpoints = Checkpoints.of_stage("train_teacher", outputs["checkpoints"], params, inputs, restart)
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


def import_as_is(
    model: PrunableNet,
    arch: str,
    data: Prepared,
    val: BatchIterable,
    outputs: dict[str, Path],
    tracker: StageTracker,
) -> None:
    """`train_teacher.epochs: 0`: the checkpoint is the teacher, measured on the validation split and
    written with the usual outputs (its history is that one row, epoch 0)."""
    with torch.no_grad():
        result = evaluate(model, val)
    log.info("teacher imported as it is: val acc %.4f, val loss %.4f", result.accuracy, result.loss)
    tracker.log_metrics({"val_loss": result.loss, "val_acc": result.accuracy}, step=0)
    save_model(outputs["model"], model, arch, data.num_classes, data.input_shape[0])
    write_history(outputs["history"], [{"epoch": 0, "val_loss": result.loss, "val_acc": result.accuracy}])
    write_json(outputs["metrics"], {"val_acc": result.accuracy, "val_loss": result.loss})
    outputs["checkpoints"].mkdir(parents=True, exist_ok=True)  # a declared output: nothing to resume
