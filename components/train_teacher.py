"""Stage `train_teacher`: SGD training of the full network with validation every epoch.

The checkpoint of every epoch (model, optimizer, schedule) goes to the persistent `checkpoints`
directory so `--resume` continues an interrupted run; the output model is the final epoch's.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from cdc.data import load_prepared
from cdc.io import save_model, save_torch, write_json
from cdc.models import build_model
from cdc.params import Params
from cdc.train import evaluate, sgd, train_one_epoch, warmup_cosine
from components.history import record_epoch, write_history
from components.progress import progress
from components.runtime import stage_runtime
from components.tracking import StageTracker

log = logging.getLogger(__name__)


def run(
    params: Params,
    inputs: dict[str, Path],
    outputs: dict[str, Path],
    tracker: StageTracker,
    resume: bool = False,
) -> None:
    p = params.train_teacher
    runtime = stage_runtime(params, tracker)
    data = load_prepared(inputs["prepared"])
    torch.manual_seed(params.seed)
    model = build_model(p.arch, data.num_classes, data.input_shape[0]).to(runtime.device)
    train = data.training_batches(p.batch_size, params.seed, runtime.device, p.augment, p.hflip)
    val = data.batches("val", 512, device=runtime.device)
    optimizer = sgd(model, p.lr, p.momentum, p.weight_decay)
    scheduler = warmup_cosine(optimizer, p.epochs * len(train), int(p.warmup_epochs * len(train)))

    ckpt_dir = outputs["checkpoints"]
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    last = ckpt_dir / "last.pt"
    history: list[dict[str, float]] = []
    start = 0
    if resume and last.exists():
        # on the CPU: RNG states must stay there; the optimizer moves its state to the parameters
        state = torch.load(last, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        train.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history, start = state["history"], state["epoch"]
        log.info("resumed from %s at epoch %d", last, start)
    else:
        for old in ckpt_dir.glob("*.pt"):
            old.unlink()

    for epoch in range(start, p.epochs):
        bar = progress(train, f"teacher epoch {epoch + 1}/{p.epochs}")
        tr = train_one_epoch(model, bar, optimizer, scheduler, runtime=runtime)
        va = evaluate(model, val)
        lr = optimizer.param_groups[0]["lr"]
        record_epoch(history, tracker, "teacher", epoch + 1, p.epochs, tr, va, lr=lr)
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "generator": train.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": history,
            "epoch": epoch + 1,
        }
        save_torch(ckpt_dir / f"epoch_{epoch + 1:03d}.pt", state)
        save_torch(last, state)

    save_model(outputs["model"], model, p.arch, data.num_classes, data.input_shape[0])
    write_history(outputs["history"], history)
    write_json(outputs["metrics"], {"val_acc": history[-1]["val_acc"], "val_loss": history[-1]["val_loss"]})
