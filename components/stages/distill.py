"""Stage `distill`: fine-tune the pruned student with CE + KD + DCA feature loss (method §5).

loss = CE(y, s) + kd_weight * T^2 KL(t/T || s/T) + dca_weight * mean((f_S W_S - f_T W_T)^2), with the
teacher frozen in eval mode, W fixed within an epoch, and the student basis refitted every
`refit_every` epochs (sign-aligned to the teacher's). Checkpoints and resume as train_teacher's.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cdc import distributed
from cdc.data import AnySplit, Prepared, load_prepared, stratified_subset
from cdc.dca import accumulate_scatter, align_signs, feature_tap, fit_dca, pooled_features
from cdc.io import save_model, write_json
from cdc.models import PrunableNet
from cdc.params import Params
from cdc.train import EpochResult, evaluate, kd_loss, recalibrate_bn, sgd, warmup_cosine
from components import inputs as checked
from components.checkpoint import Checkpoints
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
    p = params.distill
    runtime = stage_runtime(params, tracker)
    device = runtime.device
    data = load_prepared(inputs["prepared"], params.data.workers)
    teacher, record = checked.teacher(inputs["teacher"], data)
    teacher.to(device)
    student = checked.pruned(inputs["pruned"], record).to(device)
    for q in teacher.parameters():
        q.requires_grad_(False)
    dca = checked.dca_bases(inputs["dca"], teacher)
    layer, pool = str(dca["layer"]), int(dca["pool"]) or None
    label_map = dca["label_map"]
    w_t = torch.from_numpy(dca["w_teacher"]).float().to(device)
    w_s = torch.from_numpy(dca["w_student"]).float().to(device)
    fit_idx = stratified_subset(data.train.labels, int(dca["images"]), params.seed)
    fit_split = data.train.subset(fit_idx)

    torch.manual_seed(params.seed)
    checkpoints = Checkpoints.of_stage("distill", outputs["checkpoints"], params, inputs, restart)
    state = checkpoints.resume()
    if state is None and p.bn_recalibration_batches:  # removed channels shift the next layers' inputs
        recal = data.batches(  # every rank the same full batches: the same statistics everywhere
            "train", p.batch_size, shuffle=True, seed=params.seed + 1, device=device, shard=(0, 1)
        )
        recalibrate_bn(student, recal, p.bn_recalibration_batches)
    train = data.training_batches(p.batch_size, params.seed, device, p.augment, p.hflip)
    val = data.batches("val", 512, device=device)
    optimizer = sgd(student, p.lr, p.momentum, p.weight_decay)
    scheduler = warmup_cosine(optimizer, p.epochs * len(train), 0)
    parts: dict[str, torch.Tensor] = {}  # summed on the device: no host sync per step
    loop = EpochLoop(
        "distill",
        student,
        optimizer,
        scheduler,
        train,
        val,
        checkpoints,
        runtime,
        f"distill.lr (now {p.lr})",
        extra=lambda totals: {"w_student": w_s.cpu(), "parts": summed(parts) if totals else {}},
    )
    if state is not None:
        loop.restore(state)
        w_s = state["w_student"].to(device)
        if distributed.current().is_main:  # the checkpoint's sums are over every rank
            parts.update(
                {k: torch.tensor(v, dtype=torch.float64, device=device) for k, v in state["parts"].items()}
            )

    def before_epoch(epoch: int, resumed: bool) -> None:
        nonlocal w_s
        if resumed:  # a resumed epoch keeps the basis it started with, and its sums
            return
        if epoch > 0 and epoch % p.refit_every == 0 and p.dca_weight > 0:
            w_s = refit_student_basis(student, fit_split, data, layer, pool, label_map, dca).to(device)
        parts.clear()

    def after_epoch(epoch: int, tr: EpochResult, va: EpochResult) -> None:
        losses = {f"{k}_loss": v / len(data.train) for k, v in summed(parts).items()}
        record_epoch(loop.history, tracker, "distill", epoch + 1, p.epochs, tr, va, **losses)

    net = parallel(student, runtime, sync_bn)
    with feature_tap(teacher, layer) as t_tap, feature_tap(student, layer) as s_tap:

        def step_loss(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.no_grad():
                t_logits = teacher(x)
                t_proj = pooled_features(t_tap["out"], pool) @ w_t
            s_logits = net(x)
            s_proj = pooled_features(s_tap["out"], pool) @ w_s
            ce = nn.functional.cross_entropy(s_logits, y)
            kd = kd_loss(s_logits, t_logits, p.temperature)
            feat = (s_proj - t_proj).square().mean()
            for name, value in (("ce", ce), ("kd", kd), ("dca", feat)):
                parts[name] = parts.get(name, 0.0) + value.detach().double() * len(y)
            return ce + p.kd_weight * kd + p.dca_weight * feat, s_logits

        loop.run(net, p.epochs, "distill", after_epoch, step_loss, before_epoch)
    history = loop.history

    if not history:  # epochs 0: the pruned model with fresh BN statistics, no fine-tune
        va = evaluate(student, val)
        history = [{"epoch": 0, "val_loss": va.loss, "val_acc": va.accuracy}]
    save_model(outputs["model"], student, record["arch"], record["num_classes"], record["in_channels"])
    write_history(outputs["history"], history)
    write_json(outputs["metrics"], {"val_acc": history[-1]["val_acc"], "val_loss": history[-1]["val_loss"]})
    checkpoints.finish()


def summed(parts: dict[str, torch.Tensor]) -> dict[str, float]:
    """The loss parts summed over every rank (each summed its share of the batches)."""
    out = {}
    for k, v in parts.items():
        total = v.clone()
        distributed.all_reduce_sum(total)
        out[k] = total.item()
    return out


def refit_student_basis(
    student: PrunableNet,
    fit_split: AnySplit,
    data: Prepared,
    layer: str,
    pool: int | None,
    label_map: np.ndarray,
    dca: dict[str, np.ndarray],
) -> torch.Tensor:
    """Refit the student's DCA basis on the fitting images and sign-align it to the teacher's."""
    device = next(student.parameters()).device
    batches = data.batches(fit_split, 256, device=device)
    acc = accumulate_scatter(student, layer, pool, batches, label_map)
    w = align_signs(fit_dca(acc), acc.centroids(), dca["w_teacher"], dca["centroids_teacher"])
    student.train()
    return torch.from_numpy(w).float()
