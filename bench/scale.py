"""The light stages at ImageNet scale: `score` with ResNet-50 widths on 1000 classes, `fit_dca` to d = 8192.

Synthetic sufficient statistics with the shapes of a ResNet-50 (the 32 inner bottleneck convs, 64..512
channels) on 1000 classes go through the stage's own steps: Parquet read, spectral grouping of a
1000-class confusion matrix, hierarchical scoring with every discriminant. DCA's regularized generalized
eigenproblem is solved for feature sizes 1024..8192 (100 components, as 100 coarse groups would ask).
Target: scoring under 5 s per discriminant on this machine. Writes bench/results/scale.json.

    python -m bench.scale [--classes 1000] [--dca-dims 1024 2048 4096 8192]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import markdown_table, reported, target, write_result
from cdc.dca import solve_dca
from cdc.discriminants import DISCRIMINANTS
from cdc.hierarchy import coarse_groups
from cdc.scoring import score_layers
from cdc.stats import LayerStats
from cdc.stats_table import read_stats, write_stats

RESNET50_INNER = [
    w for w, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)) for _ in range(blocks) for _ in (0, 1)
]


def synthetic_stats(classes: int, rng: np.random.Generator) -> dict[str, LayerStats]:
    stats = {}
    for i, width in enumerate(RESNET50_INNER):
        n = rng.integers(1000, 1300, classes)
        pixels = 49 if width == 512 else 196
        count = (n * pixels)[:, None].astype(np.float64)
        mu = rng.gamma(2.0, 0.5, (classes, width))
        var = rng.gamma(2.0, 0.5, (classes, width))
        stats[f"block{i // 2}.conv{i % 2 + 1}"] = LayerStats(n, pixels, mu * count, (var + mu**2) * count)
    return stats


def synthetic_confusion(classes: int, rng: np.random.Generator) -> np.ndarray:
    """Counts with block structure: classes confuse mostly within 20 hidden groups."""
    group = rng.integers(0, 20, classes)
    base = rng.poisson(0.2, (classes, classes)) + rng.poisson(3.0, (classes, classes)) * (
        group[:, None] == group
    )
    np.fill_diagonal(base, 40)
    return base


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--groups", type=int, default=20)
    parser.add_argument("--dca-dims", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--dca-components", type=int, default=100)
    args = parser.parse_args()
    rng = np.random.default_rng(0)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stats.parquet"
        write_stats(path, synthetic_stats(args.classes, rng))
        t_read, stats = timed(lambda: read_stats(path))
    t_group, fine_to_coarse = timed(
        lambda: coarse_groups(synthetic_confusion(args.classes, rng), args.groups, 0)
    )
    rows, records = [], []
    for name in DISCRIMINANTS:
        t_score, _ = timed(lambda name=name: score_layers(stats, name, fine_to_coarse, 17, 0))
        total = t_read + t_group + t_score
        records.append(
            {
                "discriminant": name,
                "read_s": t_read,
                "grouping_s": t_group,
                "scoring_s": t_score,
                "total_s": total,
            }
        )
        rows.append([name, f"{t_read:.2f}", f"{t_group:.2f}", f"{t_score:.2f}", f"{total:.2f}"])
    print(
        f"score: ResNet-50 inner widths ({len(RESNET50_INNER)} layers, {sum(RESNET50_INNER)} channels), "
        f"{args.classes} classes, {args.groups} coarse groups\n"
    )
    print(
        markdown_table(
            ["discriminant", "Parquet read (s)", "spectral grouping (s)", "scoring (s)", "total (s)"], rows
        )
    )

    dca_rows, dca_records = [], []
    for d in args.dca_dims:
        x = rng.standard_normal((d + 64, d)) / np.sqrt(d)
        s_w = x.T @ x
        m = rng.standard_normal((args.dca_components, d))
        s_b = m.T @ m / args.dca_components
        t_solve, (w, _) = timed(lambda s_b=s_b, s_w=s_w: solve_dca(s_b, s_w, args.dca_components))
        dca_records.append({"dim": d, "components": args.dca_components, "solve_s": t_solve})
        dca_rows.append([d, args.dca_components, f"{t_solve:.2f}"])
        print(f"fit_dca d={d}: {t_solve:.2f} s", flush=True)
    print("\n" + markdown_table(["feature dim", "components", "DCA solve (s)"], dca_rows))
    worst = max(r["total_s"] for r in records)
    write_result(
        "scale",
        {
            "classes": args.classes,
            "groups": args.groups,
            "layers": len(RESNET50_INNER),
            "score": records,
            "dca": dca_records,
        },
        [
            target(
                f"score stage, {args.classes} classes, ResNet-50 widths, slowest discriminant (s)",
                worst,
                "<=",
                5.0,
            ),
            reported(f"fit_dca solve at d={dca_records[-1]['dim']} (s)", dca_records[-1]["solve_s"]),
        ],
        "python -m bench.scale " + " ".join(sys.argv[1:]),
    )


if __name__ == "__main__":
    main()
