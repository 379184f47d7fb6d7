"""Which channels does each discriminant keep? Accuracy of the pruned teacher before fine-tuning.

Uses the pipeline's own artifacts (run `make run` first): the teacher, its activation statistics and
confusion matrix. For every discriminant (and `random` over several seeds) the teacher is pruned with
the params' budget, its BN statistics recalibrated on training data, and scored on the validation
split. Prints a table and writes bench/results/scoring_quality.json.

    python bench/scoring_quality.py [--random-seeds 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from cdc.data import load_prepared
from cdc.discriminants import DISCRIMINANTS
from cdc.flops import count_macs
from cdc.hierarchy import coarse_block_count, coarse_groups
from cdc.io import load_model, read_json
from cdc.params import load_params
from cdc.pruning import channels_to_remove, keep_counts, prune_channels
from cdc.scoring import score_layers
from cdc.stats_table import read_stats
from cdc.train import evaluate, recalibrate_bn


def pruned_accuracy(teacher_path: Path, scored, params, data, seed: int) -> tuple[float, float]:
    model, _ = load_model(teacher_path)
    names = [layer.name for layer in model.prunable_layers()]
    keep = keep_counts(params.prune.budget, names, model.widths(), params.prune.model_dump())
    removals = {ls.layer: channels_to_remove(ls.scores, k) for ls, k in zip(scored, keep, strict=True)}
    full = count_macs(model, data.input_shape)
    prune_channels(model, removals, data.input_shape)
    torch.manual_seed(seed)
    recalibrate_bn(
        model, data.batches("train", 128, shuffle=True, seed=seed), params.evaluate.bn_recalibration_batches
    )
    acc = evaluate(model, data.batches("val", 512)).accuracy
    return acc, count_macs(model, data.input_shape) / full


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--random-seeds", type=int, default=8)
    parser.add_argument("--out", default="bench/results/scoring_quality.json")
    args = parser.parse_args()
    params = load_params(args.params)
    data = load_prepared(Path("data/prepared"))
    stats = read_stats(Path("data/stats/stats.parquet"))
    confusion = np.asarray(read_json("data/stats/confusion.json")["matrix"])
    groups = coarse_groups(confusion, params.score.n_coarse, params.seed)
    t = coarse_block_count(len(stats), params.score.coarse_blocks, params.score.coarse_fraction)
    teacher = Path("data/teacher/model.pt")
    base = evaluate(load_model(teacher)[0], data.batches("val", 512)).accuracy

    rows = []
    for name in sorted(DISCRIMINANTS):
        seeds = range(args.random_seeds) if name == "random" else [params.seed]
        variants = [("n/a", 0)] if name == "random" else [("hierarchical", t), ("fine only", 0)]
        for label, threshold in variants:
            accs = []
            start = time.perf_counter()
            for seed in seeds:
                scored = score_layers(stats, name, groups, threshold, seed)
                acc, flops_ratio = pruned_accuracy(teacher, scored, params, data, params.seed)
                accs.append(acc)
            rows.append(
                {
                    "discriminant": name,
                    "labels": label,
                    "val_acc_mean": float(np.mean(accs)),
                    "val_acc_min": float(np.min(accs)),
                    "val_acc_max": float(np.max(accs)),
                    "runs": len(accs),
                    "flops_ratio": flops_ratio,
                    "seconds": time.perf_counter() - start,
                }
            )

    print(
        f"teacher val acc {100 * base:.2f}%, budget {params.prune.budget} (ratio {params.prune.ratio}), T={t}"
    )
    print("| discriminant | labels | pruned val acc (%) | runs | FLOPs kept |")
    print("|---|---|---|---|---|")
    for r in rows:
        spread = f" ({100 * r['val_acc_min']:.1f}-{100 * r['val_acc_max']:.1f})" if r["runs"] > 1 else ""
        print(
            f"| {r['discriminant']} | {r['labels']} | {100 * r['val_acc_mean']:.2f}{spread} | {r['runs']} | "
            f"{100 * r['flops_ratio']:.1f}% |"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "date": date.today().isoformat(),
                "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
                "teacher_val_acc": base,
                "coarse_blocks": t,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
