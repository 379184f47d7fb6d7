"""Does symdiv keep better channels than its inverted ranking and than random ones, on trained teachers?

What `tests/test_scoring_quality.py` asserted before it was rebuilt on a planted network (issue 20): a
ResNet-20 teacher trained briefly (3 epochs, 10,000 Fashion-MNIST images) per seed, its channels scored
with hierarchical `symdiv`, pruned uniformly (the default `prune.ratio`, and the ratio for 70% fewer
FLOPs), BN recalibrated, no fine-tune, evaluated on 2,000 held-out images. Against: the inverted
ranking (the same scores negated) and three random draws. The outcome depends on the teacher (and on
the CPU that trained it: two machines of one kind train different weights), so it is measured here,
per seed with the spread, never asserted in a unit test.

    python -m bench.scoring_quality [--seeds 0 1 2] [--epochs 3]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import markdown_table, reported, write_result
from cdc.data import Batches, Split, channel_mean_std, stratified_split, stratified_subset
from cdc.hierarchy import coarse_block_count, coarse_groups
from cdc.models import PrunableNet, build_model
from cdc.params import PruneParams, ScoreParams
from cdc.pruning import channels_to_remove, keep_counts, prune_channels
from cdc.scoring import LayerScores, score_layers
from cdc.sources import load_raw
from cdc.stats import collect_stats, confusion_matrix
from cdc.train import evaluate, recalibrate_bn, sgd, train_one_epoch, warmup_cosine
from tools.compare import uniform_ratio_for

SHAPE = (1, 28, 28)


def batches(split: Split, batch_size: int, **kwargs: object) -> Batches:
    mean, std = channel_mean_std(split.images)
    return Batches(split, mean, std, batch_size, **kwargs)  # type: ignore[arg-type]


def teacher(raw: str, seed: int, epochs: int) -> tuple[PrunableNet, Split, Split]:
    train_all = load_raw("fashion_mnist", Path(raw)).train
    idx = stratified_subset(train_all.labels, 12000, seed=seed)
    fit_idx, val_idx = stratified_split(train_all.labels[idx], 2000 / 12000, seed=seed)
    train = Split(train_all.images[idx][fit_idx], train_all.labels[idx][fit_idx])
    val = Split(train_all.images[idx][val_idx], train_all.labels[idx][val_idx])
    torch.manual_seed(seed)
    model = build_model("resnet20", 10, 1)
    loader = batches(train, 128, shuffle=True, augment=True, seed=seed)
    optimizer = sgd(model, 0.1, 0.9, 5e-4)
    scheduler = warmup_cosine(optimizer, epochs * len(loader), len(loader) // 2)
    for _ in range(epochs):
        train_one_epoch(model, loader, optimizer, scheduler)
    return model, train, val


def pruned_accuracy(
    model: PrunableNet, train: Split, val: Split, scored: list[LayerScores], ratio: float
) -> float:
    pruned = copy.deepcopy(model)
    names = [layer.name for layer in pruned.prunable_layers()]
    keep = keep_counts(
        "uniform", names, pruned.prunable_widths(), PruneParams().model_dump() | {"ratio": ratio}
    )
    removals = {s.layer: channels_to_remove(s.scores, k) for s, k in zip(scored, keep, strict=True)}
    prune_channels(pruned, removals, SHAPE)
    recalibrate_bn(pruned, batches(train, 128, shuffle=True, seed=0), 20)
    return evaluate(pruned, batches(val, 256)).accuracy


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--raw", default="data/raw", help="folder holding FashionMNIST/raw (make data)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one teacher per seed")
    ap.add_argument("--epochs", type=int, default=3, help="teacher epochs")
    args = ap.parse_args(argv)
    defaults = ScoreParams()
    ratios = {
        "default": PruneParams().ratio,
        "70% fewer FLOPs": uniform_ratio_for("resnet20", 10, SHAPE, 0.7),
    }
    rows = []
    for seed in args.seeds:
        start = time.perf_counter()
        model, train, val = teacher(args.raw, seed, args.epochs)
        stats = collect_stats(model, batches(train, 256), 10)
        groups = coarse_groups(confusion_matrix(model, batches(val, 256), 10), defaults.n_coarse, seed=seed)
        t = coarse_block_count(len(stats), defaults.coarse_blocks, defaults.coarse_fraction)
        scored = score_layers(stats, "symdiv", groups, t, seed=seed)
        inverted = [LayerScores(s.layer, s.level, -s.scores) for s in scored]
        draws = [score_layers(stats, "random", groups, t, seed=100 * seed + d) for d in range(3)]
        row = {"seed": seed, "teacher": evaluate(model, batches(val, 256)).accuracy}
        for label, ratio in ratios.items():
            row[f"symdiv@{label}"] = pruned_accuracy(model, train, val, scored, ratio)
            row[f"inverted@{label}"] = pruned_accuracy(model, train, val, inverted, ratio)
            row[f"random@{label}"] = float(
                np.mean([pruned_accuracy(model, train, val, d, ratio) for d in draws])
            )
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        print(
            f"seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "seed"),
            file=sys.stderr,
        )

    header = ["seed", "teacher"] + [f"{m} @ {r}" for r in ratios for m in ("symdiv", "inverted", "random")]
    table = [[r["seed"], f"{100 * r['teacher']:.1f}"] for r in rows]
    for line, r in zip(table, rows, strict=True):
        line += [f"{100 * r[f'{m}@{k}']:.1f}" for k in ratios for m in ("symdiv", "inverted", "random")]
    print(markdown_table(header, table))
    targets = []
    for label in ratios:
        for other in ("inverted", "random"):
            gaps = np.array([r[f"symdiv@{label}"] - r[f"{other}@{label}"] for r in rows])
            spread = float(gaps.std(ddof=1)) if len(gaps) > 1 else 0.0
            wins = int((gaps > 0).sum())
            n = len(gaps)
            note = f"mean over {n} teachers, ± std {100 * spread:.1f}; symdiv ahead on {wins}/{n}"
            targets.append(
                reported(f"symdiv - {other} at {label} (points)", round(100 * gaps.mean(), 2), note)
            )
            print(
                f"symdiv - {other} at {label}: {100 * gaps.mean():+.1f} ± {100 * spread:.1f} points ({note})"
            )
    command = "python -m bench.scoring_quality " + " ".join(argv if argv is not None else sys.argv[1:])
    write_result(
        "scoring_quality", {"ratios": ratios, "epochs": args.epochs, "rows": rows}, targets, command.strip()
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
