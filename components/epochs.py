"""The resumable epoch loop both training stages run (`train_teacher`, `distill`).

One place for what makes a training stage survive a kill: resume from the last checkpoint (mid-epoch
too: the epoch's batches are redrawn from the generator state it started from, its sums carried over),
a checkpoint at the end of every epoch, SIGTERM turned into a checkpoint at the next step, the fail
points the reliability tests kill at, and a diverging loss reported with the checkpoint to go back to.
A stage adds its own state (`extra`) and what happens around an epoch (`before_epoch`, `after_epoch`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cdc import distributed
from cdc.device import Runtime
from cdc.errors import Preempted
from cdc.train import EpochResult, EpochTotals, StepLoss, TrainingDiverged, evaluate, train_one_epoch
from components.checkpoint import Checkpoints, failpoint, stop_on_sigterm
from components.progress import progress

log = logging.getLogger(__name__)


@dataclass
class EpochLoop:
    stage: str  # names the fail points (`<stage>.step`, `<stage>.epoch`) and the messages
    model: nn.Module  # what is checkpointed and validated (the unwrapped network)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train: Any  # training batches with a `generator` (cdc.data)
    val: Any
    checkpoints: Checkpoints
    runtime: Runtime
    lr_hint: str  # the param to lower when the loss diverges, with its value, e.g. "distill.lr (now 0.1)"
    # the stage's own state in every checkpoint; `totals` is None at an epoch's end, set mid-epoch
    extra: Callable[[EpochTotals | None], dict[str, Any]] = lambda totals: {}
    history: list[dict[str, float]] = field(default_factory=list)
    start: int = 0  # epochs done
    partial: dict[str, Any] | None = None  # the sums of an epoch interrupted mid-way

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's `state` (the stage restores its `extra` keys itself)."""
        # on the CPU: RNG states must stay there; the optimizer moves its state to the parameters
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.train.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.history, self.start, self.partial = state["history"], state["epoch"], state["epoch_totals"]
        at = f" step {self.partial['steps']}" if self.partial else ""
        log.info("resumed from %s after epoch %d%s", self.checkpoints.last, self.start, at)

    def snapshot(self, epoch: int, generator: torch.Tensor, totals: EpochTotals | None) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": generator,  # mid-epoch: the state the epoch started from, to redraw its batches
            "torch_rng": torch.get_rng_state(),
            **self.extra(totals),
            "history": self.history,
            "epoch": epoch,
            "epoch_totals": totals.state() if totals else None,
        }

    def run(
        self,
        net: nn.Module,
        epochs: int,
        label: str,
        after_epoch: Callable[[int, EpochResult, EpochResult], None],
        step_loss: StepLoss | None = None,
        before_epoch: Callable[[int, bool], None] = lambda epoch, resumed: None,
    ) -> None:
        """Epochs `start`..`epochs` of `net` (the model, or its DistributedDataParallel wrapper);
        `before_epoch(epoch, resumed)` runs first, `after_epoch(epoch, train, val)` after validation."""
        with stop_on_sigterm() as stop:
            for epoch in range(self.start, epochs):
                before_epoch(epoch, self.partial is not None)
                epoch_start = self.train.generator.get_state()

                def after_step(
                    totals: EpochTotals, epoch: int = epoch, epoch_start: torch.Tensor = epoch_start
                ) -> None:
                    failpoint(f"{self.stage}.step", epoch * len(self.train) + totals.steps)
                    if stop.requested:
                        self.checkpoints.save(self.snapshot(epoch, epoch_start, totals))
                        where = f"epoch {epoch + 1} after step {totals.steps}"
                        raise Preempted(f"{self.stage} stopped in {where}")

                bar = progress(self.train, f"{label} epoch {epoch + 1}/{epochs}")
                resumed = EpochTotals.resumed(self.partial, distributed.current().is_main)
                totals = EpochTotals(self.runtime.device, resumed)
                self.partial = None
                try:
                    tr = train_one_epoch(
                        net, bar, self.optimizer, self.scheduler, step_loss, self.runtime, totals, after_step
                    )
                except TrainingDiverged as err:
                    raise TrainingDiverged(
                        f"{self.stage} epoch {epoch + 1}: {err}; the last good checkpoint is "
                        f"{self.checkpoints.last} (epoch {epoch}); lower {self.lr_hint} and rerun"
                    ) from None
                after_epoch(epoch, tr, evaluate(self.model, self.val))
                end = self.snapshot(epoch + 1, self.train.generator.get_state(), None)
                self.checkpoints.save(end, epoch + 1)
                failpoint(f"{self.stage}.epoch", epoch + 1)
