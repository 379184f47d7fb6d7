"""Training, evaluation, distillation and measurement loops: plain functions over batch iterables.

Batches arrive on the model's device (see `cdc.data.Batches`); running sums stay on it as tensors, so
a GPU step never waits for the host except for the finiteness check of the loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from cdc import distributed
from cdc.device import CPU, Runtime
from cdc.errors import InputError

BatchIterable = Iterable[tuple[torch.Tensor, torch.Tensor]]


def sgd(
    model: nn.Module, lr: float, momentum: float, weight_decay: float, nesterov: bool = True
) -> torch.optim.SGD:
    """SGD with weight decay on conv/linear weights only, not on BN parameters or biases (method §6)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule: linear warm-up, then cosine to zero. Short CPU budgets need no step decay."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class EpochResult:
    loss: float
    accuracy: float


StepLoss = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class TrainingDiverged(InputError):
    """A non-finite loss: the step's update is not applied, so the last checkpoint stays good."""


class EpochTotals:
    """The running sums of a training epoch and the steps taken: what a checkpoint taken mid-epoch
    keeps so that the resumed epoch reports what an uninterrupted one would. The sums stay on the
    device as tensors (no host sync per step) until `state()` is asked for."""

    def __init__(self, device: torch.device, state: dict[str, float] | None = None) -> None:
        state = state or {}
        self.steps = int(state.get("steps", 0))
        self.seen = int(state.get("seen", 0))
        self.loss = torch.tensor(state.get("loss", 0.0), dtype=torch.float64, device=device)
        self.correct = torch.tensor(int(state.get("correct", 0)), dtype=torch.int64, device=device)

    def state(self) -> dict[str, float]:
        """The sums over every process (a checkpoint's; resumed, rank 0 carries them, the others only
        the step count: see `resumed`)."""
        loss, correct, seen = self._summed()
        return {"steps": self.steps, "seen": seen, "loss": loss, "correct": correct}

    @staticmethod
    def resumed(state: dict[str, float] | None, is_main: bool) -> dict[str, float] | None:
        return state if state is None or is_main else {"steps": state["steps"]}

    def _summed(self) -> tuple[float, int, int]:
        seen = torch.tensor(self.seen, dtype=torch.int64, device=self.loss.device)
        loss, correct = self.loss.clone(), self.correct.clone()
        distributed.all_reduce_sum(loss, correct, seen)
        return loss.item(), int(correct), int(seen)

    def result(self) -> EpochResult:
        loss, correct, seen = self._summed()
        return EpochResult(loss / max(seen, 1), correct / max(seen, 1))


def train_one_epoch(
    model: nn.Module,
    batches: BatchIterable,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    step_loss: StepLoss | None = None,
    runtime: Runtime = CPU,
    totals: EpochTotals | None = None,
    after_step: Callable[[EpochTotals], None] | None = None,
) -> EpochResult:
    """One epoch; `step_loss(x, y) -> (loss, logits)` replaces plain cross-entropy (distillation).

    The forward pass and loss run under the runtime's autocast (mixed precision on CUDA only).
    Resuming an epoch: `totals` from a checkpoint taken after `totals.steps` steps; those batches are
    drawn again (the same shuffling and augmentation draws) and skipped. `after_step(totals)` runs
    after every update (checkpoint on preemption). A non-finite loss raises TrainingDiverged before
    its update.
    """
    model.train()
    scaler = runtime.grad_scaler()
    totals = totals or EpochTotals(runtime.device)
    done = totals.steps
    for step, (x, y) in enumerate(batches):
        if step < done:
            continue
        with runtime.autocast():
            if step_loss is None:
                logits = model(x)
                loss = nn.functional.cross_entropy(logits, y)
            else:
                loss, logits = step_loss(x, y)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"non-finite training loss ({loss.item()}) at step {step + 1}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        totals.loss += loss.detach().double() * len(y)
        totals.correct += (logits.argmax(1) == y).sum()
        totals.seen += len(y)
        totals.steps = step + 1
        if after_step is not None:
            after_step(totals)
    return totals.result()


@torch.no_grad()
def evaluate(model: nn.Module, batches: BatchIterable) -> EpochResult:
    """Full-precision evaluation on the batches' device (accuracy is reported, never autocast)."""
    model.eval()
    device = next(model.parameters()).device
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = torch.zeros((), dtype=torch.int64, device=device)
    for x, y in batches:
        logits = model(x)
        total_loss += nn.functional.cross_entropy(logits, y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
    distributed.all_reduce_sum(total_loss, correct, seen)  # each process evaluated its share
    return EpochResult(float(total_loss) / max(int(seen), 1), int(correct) / max(int(seen), 1))


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's KD: T^2 * KL(softmax(teacher/T) || softmax(student/T))."""
    t = temperature
    return nn.functional.kl_div(
        nn.functional.log_softmax(student_logits / t, 1),
        nn.functional.log_softmax(teacher_logits / t, 1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: BatchIterable, max_batches: int | None = None) -> None:
    """Re-estimate BN running statistics as a cumulative average over training batches.

    After channels are removed, the next layers see a different input distribution; fresh BN
    statistics isolate the quality of the kept channels from stale normalization.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for i, (x, _) in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        model(x)
    for m, momentum in zip(bns, saved, strict=True):
        m.momentum = momentum
    model.eval()
