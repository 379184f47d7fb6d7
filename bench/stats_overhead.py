"""Cost of the activation-statistics pass relative to plain inference over the same images, and its memory.

Target: statistics-pass throughput >= 0.85 of plain eval-mode inference (same model, images, device,
batch). The two passes are timed interleaved (cdc.latency), so a slow spell of the shared machine hits
both alike. Peak memory: the resident-set growth during the pass, in a fresh process per image count,
must not grow with the number of images (statistics are sums, never stored activations). Runs on
Fashion-MNIST training images (`make data`) with a freshly initialized network (the cost does not depend
on the weights). Writes bench/results/stats_overhead.json.

    python -m bench.stats_overhead [--arch resnet20] [--images 10000] [--rounds 7] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from bench.common import markdown_table, target, write_result
from cdc.data import Batches, Split, channel_mean_std, stratified_subset
from cdc.device import resolve_device
from cdc.latency import compare_latency
from cdc.models import build_model
from cdc.sources import load_raw
from cdc.stats import collect_stats


def setup(arch: str, images: int, batch_size: int, device: torch.device) -> tuple[torch.nn.Module, Batches]:
    raw = load_raw("fashion_mnist", Path("data/raw")).train
    idx = stratified_subset(raw.labels, images, seed=0)
    split = Split(raw.images[idx], raw.labels[idx])
    mean, std = channel_mean_std(split.images)
    torch.manual_seed(0)
    model = build_model(arch, 10, 1).to(device).eval()
    return model, Batches(split, mean, std, batch_size, device=device)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(arch: str, images: int, batch_size: int) -> None:
    """Print the peak resident-set growth (MiB) of one statistics pass over the memory in use before it.

    Linux: the peak (VmHWM) is reset to the current RSS through /proc/self/clear_refs just before the pass.
    """
    model, batches = setup(arch, images, batch_size, torch.device("cpu"))
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    collect_stats(model, batches, 10)
    print(json.dumps({"images": images, "growth_mib": (_status_kib("VmHWM") - before) / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.arch, args.memory_child, args.batch_size)
        return

    device = resolve_device(args.device)
    model, batches = setup(args.arch, args.images, args.batch_size, device)

    def plain() -> None:
        with torch.no_grad():
            for x, _ in batches:
                model(x)

    lat = compare_latency(
        {"plain inference": plain, "statistics pass": lambda: collect_stats(model, batches, 10)},
        rounds=args.rounds,
        block_ms=0.0,
        warmup=1,
        device=device,
    )
    throughput_ratio = lat["statistics pass"].speedup
    memory = []
    for n in (args.images // 4, args.images):
        growth = []
        for _ in range(3):  # the allocator's peak varies by tens of MiB from run to run: median of 3
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "bench.stats_overhead",
                    "--arch",
                    args.arch,
                    "--memory-child",
                    str(n),
                    "--batch-size",
                    str(args.batch_size),
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            growth.append(json.loads(out.stdout.strip().splitlines()[-1])["growth_mib"])
        memory.append({"images": n, "growth_mib": statistics.median(growth), "runs_mib": growth})
    print(
        markdown_table(
            ["arch", "device", "images", "plain inference (s)", "statistics pass (s)", "throughput ratio"],
            [
                [
                    args.arch,
                    device,
                    args.images,
                    f"{lat['plain inference'].ms / 1000:.2f}",
                    f"{lat['statistics pass'].ms / 1000:.2f}",
                    f"{throughput_ratio:.3f} ± {lat['statistics pass'].spread:.3f}",
                ]
            ],
        )
    )
    print(
        "\n"
        + markdown_table(
            ["images (CPU)", "peak RSS growth during the pass (MiB)"],
            [[m["images"], f"{m['growth_mib']:.1f}"] for m in memory],
        )
    )
    growth_ratio = memory[1]["growth_mib"] / max(memory[0]["growth_mib"], 1.0)
    targets = [
        target(f"statistics pass / plain inference throughput ({device.type})", throughput_ratio, ">=", 0.85),
        target(
            f"peak memory growth, {memory[1]['images']} vs {memory[0]['images']} images",
            growth_ratio,
            "<=",
            1.1,
            "flat in the number of images",
        ),
    ]
    write_result(
        "stats_overhead" if device.type == "cpu" else f"stats_overhead_{device.type}",
        {
            "arch": args.arch,
            "device": str(device),
            "images": args.images,
            "batch_size": args.batch_size,
            "plain_s": lat["plain inference"].ms / 1000,
            "stats_s": lat["statistics pass"].ms / 1000,
            "throughput_ratio": throughput_ratio,
            "throughput_ratio_spread": lat["statistics pass"].spread,
            "memory": memory,
        },
        targets,
        "python -m bench.stats_overhead " + " ".join(sys.argv[1:]),
    )


if __name__ == "__main__":
    main()
