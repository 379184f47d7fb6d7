"""Stage `train_teacher`: SGD training of the full network with validation every epoch.

The checkpoint of every epoch (model, optimizer, schedule, RNG states) goes to the persistent
`checkpoints` directory; a rerun after a kill resumes from the last one, and SIGTERM checkpoints at
the next step (components/checkpoint.py). The output model is the final epoch's.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from cdc import distributed
from cdc.data import load_prepared
from cdc.errors import Preempted
from cdc.images import file_md5
from cdc.io import load_initial_weights, save_model, write_json
from cdc.models import build_model
from cdc.params import Params
from cdc.train import EpochTotals, TrainingDiverged, evaluate, sgd, train_one_epoch, warmup_cosine
from components.checkpoint import Checkpoints, failpoint, fingerprint, stop_on_sigterm
from components.history import record_epoch, write_history
from components.progress import progress
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
    history: list[dict[str, float]] = []
    start, partial = 0, None
    state = checkpoints.resume()
    if state is not None:
        # on the CPU: RNG states must stay there; the optimizer moves its state to the parameters
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        train.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history, start, partial = state["history"], state["epoch"], state["epoch_totals"]
        at = f" step {partial['steps']}" if partial else ""
        log.info("resumed from %s after epoch %d%s", checkpoints.last, start, at)

    def snapshot(epoch: int, generator: torch.Tensor, totals: EpochTotals | None) -> dict:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "generator": generator,  # mid-epoch: the state the epoch started from, to redraw its batches
            "torch_rng": torch.get_rng_state(),
            "history": history,
            "epoch": epoch,
            "epoch_totals": totals.state() if totals else None,
        }

    net = parallel(model, runtime, sync_bn)
    with stop_on_sigterm() as stop:
        for epoch in range(start, p.epochs):
            epoch_start = train.generator.get_state()

            def after_step(
                totals: EpochTotals, epoch: int = epoch, epoch_start: torch.Tensor = epoch_start
            ) -> None:
                failpoint("train_teacher.step", epoch * len(train) + totals.steps)
                if stop.requested:
                    checkpoints.save(snapshot(epoch, epoch_start, totals))
                    raise Preempted(f"train_teacher stopped in epoch {epoch + 1} after step {totals.steps}")

            bar = progress(train, f"teacher epoch {epoch + 1}/{p.epochs}")
            totals = EpochTotals(runtime.device, EpochTotals.resumed(partial, distributed.current().is_main))
            partial = None
            try:
                tr = train_one_epoch(
                    net, bar, optimizer, scheduler, runtime=runtime, totals=totals, after_step=after_step
                )
            except TrainingDiverged as err:
                raise TrainingDiverged(
                    f"train_teacher epoch {epoch + 1}: {err}; the last good checkpoint is {checkpoints.last} "
                    f"(epoch {epoch}); lower train_teacher.lr (now {p.lr}) and rerun"
                ) from None
            va = evaluate(model, val)
            lr = optimizer.param_groups[0]["lr"]
            record_epoch(history, tracker, "teacher", epoch + 1, p.epochs, tr, va, lr=lr)
            checkpoints.save(snapshot(epoch + 1, train.generator.get_state(), None), epoch + 1)
            failpoint("train_teacher.epoch", epoch + 1)

    save_model(outputs["model"], model, p.arch, data.num_classes, data.input_shape[0])
    write_history(outputs["history"], history)
    write_json(outputs["metrics"], {"val_acc": history[-1]["val_acc"], "val_loss": history[-1]["val_loss"]})
    checkpoints.finish()
