"""Cost of the activation-statistics pass relative to plain inference over the same images.

Design target: the statistics pass within 15% of plain eval-mode inference. Runs on Fashion-MNIST
training images (`make data`) with a freshly initialized network (the cost does not depend on the
weights). Prints a table and writes bench/results/stats_overhead.json.

    python bench/stats_overhead.py [--arch resnet20] [--images 10000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch

from cdc.data import Batches, Split, channel_mean_std, load_raw, stratified_subset
from cdc.models import build_model
from cdc.stats import collect_stats


def timed(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results/stats_overhead.json")
    args = parser.parse_args()

    raw = load_raw("fashion_mnist", Path("data/raw")).train
    idx = stratified_subset(raw.labels, args.images, seed=0)
    split = Split(raw.images[idx], raw.labels[idx])
    mean, std = channel_mean_std(split.images)
    batches = Batches(split, mean, std, args.batch_size)
    torch.manual_seed(0)
    model = build_model(args.arch, 10, 1).eval()

    def plain() -> None:
        with torch.no_grad():
            for x, _ in batches:
                model(x)

    plain()  # warm-up
    t_plain = timed(plain, args.repeats)
    t_stats = timed(lambda: collect_stats(model, batches, 10), args.repeats)
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "arch": args.arch,
        "images": len(split),
        "plain_s": t_plain,
        "stats_s": t_stats,
        "overhead": t_stats / t_plain - 1.0,
        "images_per_s_stats": len(split) / t_stats,
    }
    print(
        f"| arch | images | plain inference (s) | statistics pass (s) | overhead |\n|---|---|---|---|---|\n"
        f"| {args.arch} | {len(split)} | {t_plain:.2f} | {t_stats:.2f} | {100 * result['overhead']:+.1f}% |"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
