"""Stage `distill`: fine-tune the pruned student with CE + KD + DCA feature loss (method §5).

loss = CE(y, s) + kd_weight * T^2 KL(t/T || s/T) + dca_weight * mean((f_S W_S - f_T W_T)^2), with the
teacher frozen in eval mode, W fixed within an epoch, and the student basis refitted every
`refit_every` epochs (sign-aligned to the teacher's).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from cdc.data import Batches, Prepared, Split, load_prepared, stratified_subset
from cdc.dca import accumulate_scatter, align_signs, feature_tap, fit_dca, pooled_features
from cdc.io import load_model, save_model, write_json
from cdc.models import PrunableNet
from cdc.params import Params
from cdc.train import evaluate, kd_loss, recalibrate_bn, sgd, train_one_epoch, warmup_cosine
from components.history import record_epoch, write_history
from components.progress import progress
from components.runtime import stage_runtime
from components.tracking import StageTracker


def run(params: Params, inputs: dict[str, Path], outputs: dict[str, Path], tracker: StageTracker) -> None:
    p = params.distill
    runtime = stage_runtime(params, tracker)
    device = runtime.device
    data = load_prepared(inputs["prepared"])
    teacher = load_model(inputs["teacher"])[0].to(device)
    student, record = load_model(inputs["pruned"])
    student.to(device)
    for q in teacher.parameters():
        q.requires_grad_(False)
    with np.load(inputs["dca"], allow_pickle=False) as z:
        dca = {k: z[k] for k in z.files}
    layer, pool = str(dca["layer"]), int(dca["pool"]) or None
    label_map = dca["label_map"]
    w_t = torch.from_numpy(dca["w_teacher"]).float().to(device)
    w_s = torch.from_numpy(dca["w_student"]).float().to(device)
    fit_idx = stratified_subset(data.train.labels, int(dca["images"]), params.seed)
    fit_split = Split(data.train.images[fit_idx], data.train.labels[fit_idx])

    torch.manual_seed(params.seed)
    if p.bn_recalibration_batches:  # removed channels shift the next layers' inputs: fresh BN stats first
        recal = data.batches("train", p.batch_size, shuffle=True, seed=params.seed + 1, device=device)
        recalibrate_bn(student, recal, p.bn_recalibration_batches)
    train = data.training_batches(p.batch_size, params.seed, device, p.augment, p.hflip)
    val = data.batches("val", 512, device=device)
    optimizer = sgd(student, p.lr, p.momentum, p.weight_decay)
    scheduler = warmup_cosine(optimizer, p.epochs * len(train), 0)
    parts: dict[str, torch.Tensor] = {}  # summed on the device: no host sync per step

    with feature_tap(teacher, layer) as t_tap, feature_tap(student, layer) as s_tap:

        def step_loss(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.no_grad():
                t_logits = teacher(x)
                t_proj = pooled_features(t_tap["out"], pool) @ w_t
            s_logits = student(x)
            s_proj = pooled_features(s_tap["out"], pool) @ w_s
            ce = nn.functional.cross_entropy(s_logits, y)
            kd = kd_loss(s_logits, t_logits, p.temperature)
            feat = (s_proj - t_proj).square().mean()
            for name, value in (("ce", ce), ("kd", kd), ("dca", feat)):
                parts[name] = parts.get(name, 0.0) + value.detach().double() * len(y)
            return ce + p.kd_weight * kd + p.dca_weight * feat, s_logits

        history = []
        for epoch in range(p.epochs):
            if epoch > 0 and epoch % p.refit_every == 0 and p.dca_weight > 0:
                w_s = refit_student_basis(student, fit_split, data, layer, pool, label_map, dca).to(device)
            parts.clear()
            bar = progress(train, f"distill epoch {epoch + 1}/{p.epochs}")
            tr = train_one_epoch(student, bar, optimizer, scheduler, step_loss, runtime)
            va = evaluate(student, val)
            n = len(data.train)
            losses = {f"{k}_loss": v.item() / n for k, v in parts.items()}
            record_epoch(history, tracker, "distill", epoch + 1, p.epochs, tr, va, **losses)

    if not history:  # epochs 0: the pruned model with fresh BN statistics, no fine-tune
        va = evaluate(student, val)
        history = [{"epoch": 0, "val_loss": va.loss, "val_acc": va.accuracy}]
    save_model(outputs["model"], student, record["arch"], record["num_classes"], record["in_channels"])
    write_history(outputs["history"], history)
    write_json(outputs["metrics"], {"val_acc": history[-1]["val_acc"], "val_loss": history[-1]["val_loss"]})


def refit_student_basis(
    student: PrunableNet,
    fit_split: Split,
    data: Prepared,
    layer: str,
    pool: int | None,
    label_map: np.ndarray,
    dca: dict[str, np.ndarray],
) -> torch.Tensor:
    """Refit the student's DCA basis on the fitting images and sign-align it to the teacher's."""
    device = next(student.parameters()).device
    batches = Batches(fit_split, data.meta["mean"], data.meta["std"], 256, device=device)
    acc = accumulate_scatter(student, layer, pool, batches, label_map)
    w = align_signs(fit_dca(acc), acc.centroids(), dca["w_teacher"], dca["centroids_teacher"])
    student.train()
    return torch.from_numpy(w).float()
