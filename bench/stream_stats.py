"""The statistics pass over a streamed image folder: throughput and peak memory at two dataset sizes, as
one process and as two (torchrun, gloo on CPU; NCCL on GPUs).

Generates an ImageFolder of JPEGs (10 classes, about 40 x 48 px; tests/image_tree.py), prepares it with
`data.storage: files` (file list + md5, no pixels copied) at each size, and runs the real
`cdc dump_stats [--nproc N]` on a freshly initialized network (the cost does not depend on the weights).
Throughput: training images / the stage's own time (MLflow `timing.stage_s` of rank 0: the pass over the
training split plus the validation confusion pass, without process start-up). Peak memory: the largest
resident set of any process of the run (the stage, or each torchrun rank and its DataLoader workers),
which must stay flat as the dataset grows: statistics are sums, images are decoded batch by batch.
Writes bench/results/stream_stats.json.

    python -m bench.stream_stats [--sizes 10000 40000] [--nproc 1 2] [--workers 2] [--image-size 32]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.common import markdown_table, reported, stage_seconds, target, write_result
from cdc.io import save_model
from cdc.models import build_model
from tests.image_tree import make_image_tree

CLASSES = [f"class{k}" for k in range(10)]
# the command in a child that reports its descendants' largest resident set (KiB) on its last line
MEASURED = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)"
)


def run_measured(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, int]:
    """(wall seconds, peak RSS in MiB of the largest process) of a command."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", MEASURED, *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return wall, int(proc.stdout.strip().splitlines()[-1]) // 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 40000], help="training images")
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="processes per run")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers per process")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--arch", default="resnet20")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "cdc-stream-bench",
        help="where the generated images and the runs go (default: the system's temporary directory)",
    )
    args = ap.parse_args()

    work = args.workdir.resolve()
    tree = work / "images"
    per_class = max(args.sizes) // len(CLASSES)
    if not (tree / "train" / CLASSES[-1] / f"{per_class - 1:05d}.png").exists():
        shutil.rmtree(tree, ignore_errors=True)
        start = time.perf_counter()
        make_image_tree(tree, CLASSES, {"train": per_class, "val": 20, "test": 20})
        print(f"generated {per_class * len(CLASSES) + 400} images in {time.perf_counter() - start:.0f} s")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "CDC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    rows, results = [], []
    for size in args.sizes:
        run = work / f"n{size}"
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True)
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{run / 'mlflow.db'}"
        params = {
            "data": {
                "dataset": "imagefolder",
                "root": str(tree),
                "image_size": args.image_size,
                "storage": "files",
                "train_limit": size,
                "workers": args.workers,
            },
            "dump_stats": {"batch_size": args.batch_size},
            "runtime": {"device": "auto"},
        }
        (run / "params.yaml").write_text(yaml.safe_dump(params))
        wall, _ = run_measured(["cdc", "prepare", "--prepared", "prepared"], run, env)
        meta = json.loads((run / "prepared" / "meta.json").read_text())
        n = meta["sizes"]["train"]
        print(f"{size}: prepared {n} training images (file list + md5) in {wall:.0f} s")
        model = build_model(args.arch, len(CLASSES), 3)
        save_model(run / "teacher.pt", model, args.arch, len(CLASSES), 3)
        for nproc in args.nproc:
            outs = [
                "--stats",
                f"s{nproc}.parquet",
                "--grid",
                f"g{nproc}.parquet",
                "--confusion",
                f"c{nproc}.json",
            ]
            command = [
                "cdc",
                "dump_stats",
                "--nproc",
                str(nproc),
                "--prepared",
                "prepared",
                "--teacher",
                "teacher.pt",
            ]
            wall, peak = run_measured([*command, *outs], run, env)
            seconds = stage_seconds(run / "mlflow.db", "dump_stats")
            result = {
                "images": n,
                "nproc": nproc,
                "workers": args.workers,
                "stage_s": round(seconds, 2),
                "wall_s": round(wall, 1),
                "images_per_s": round(n / seconds, 1),
                "peak_rss_mib": peak,
            }
            results.append(result)
            rows.append([n, nproc, args.workers, f"{seconds:.1f}", f"{n / seconds:.0f}", peak])
            print(rows[-1], flush=True)

    header = ["training images", "processes", "workers each", "stage s", "images/s", "peak RSS MiB"]
    table = markdown_table(header, rows)
    print(table)
    targets = []
    small, large = min(args.sizes), max(args.sizes)
    for nproc in args.nproc:
        peak = {r["images"]: r["peak_rss_mib"] for r in results if r["nproc"] == nproc}
        ips = {r["images"]: r["images_per_s"] for r in results if r["nproc"] == nproc}
        lo, hi = min(peak), max(peak)
        targets.append(
            target(
                f"peak RSS {hi} / {lo} images, {nproc} process(es)",
                round(peak[hi] / peak[lo], 3),
                "<=",
                1.1,
                "memory flat in the dataset size",
            )
        )
        targets.append(
            reported(f"throughput {hi} / {lo} images, {nproc} process(es)", round(ips[hi] / ips[lo], 3))
        )
    if len(args.nproc) > 1:
        for n in {r["images"] for r in results}:
            ips = {r["nproc"]: r["images_per_s"] for r in results if r["images"] == n}
            a, b = min(ips), max(ips)
            targets.append(reported(f"speed-up {b} vs {a} processes, {n} images", round(ips[b] / ips[a], 3)))
    command = "python -m bench.stream_stats " + " ".join(
        [
            f"--sizes {' '.join(map(str, args.sizes))}",
            f"--nproc {' '.join(map(str, args.nproc))}",
            f"--workers {args.workers}",
            f"--image-size {args.image_size}",
        ]
    )
    path = write_result(
        "stream_stats", {"runs": results, "table": table, "arch": args.arch}, targets, command
    )
    print(f"wrote {path}; sizes {small}..{large}")


if __name__ == "__main__":
    main()
