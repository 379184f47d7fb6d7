"""Does the `train_teacher` stage add anything to the training it runs? Its images/s over a bare loop.

The stage runs for real (`components.runner.execute`: params validation, MLflow run on SQLite, progress
bars, per-epoch validation, history, checkpoints of every epoch, output hashing); the bare loop is the
PyTorch one a user would write for the same work: same model, data, augmentation, batch, optimizer,
schedule and the same validation pass each epoch, nothing else. The two alternate (bare, stage, bare,
...) so the shared machine's drift hits both. Target: stage images/s >= 0.95 of the bare loop's.
Writes bench/results/train_overhead.json.

    python -m bench.train_overhead [--images 4000] [--epochs 2] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from bench.common import markdown_table, target, write_result
from cdc.data import load_prepared
from cdc.models import build_model
from cdc.params import Params
from cdc.train import evaluate, sgd, warmup_cosine
from components.runner import execute
from components.stages import STAGE_BY_NAME

RAW = Path("data/raw").resolve()


def bare_loop(params: Params, prepared: Path) -> None:
    p = params.train_teacher
    data = load_prepared(prepared)
    torch.manual_seed(params.seed)
    model = build_model(p.arch, data.num_classes, data.input_shape[0])
    train = data.training_batches(p.batch_size, params.seed, torch.device("cpu"), p.augment, p.hflip)
    val = data.batches("val", 512)
    optimizer = sgd(model, p.lr, p.momentum, p.weight_decay)
    scheduler = warmup_cosine(optimizer, p.epochs * len(train), int(p.warmup_epochs * len(train)))
    for _ in range(p.epochs):
        model.train()
        for x, y in train:
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        evaluate(model, val)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=4000, help="training images (class-balanced)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.chdir(work)  # MLflow's SQLite store and artifacts land here
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        params = Params.model_validate(
            {
                "data": {"train_limit": args.images + 500, "val_size": 500, "test_limit": 100},
                "train_teacher": {"epochs": args.epochs},
                "runtime": {"device": "cpu"},
            }
        )
        prepared = work / "prepared"
        execute(STAGE_BY_NAME["prepare"], params, {"raw": RAW}, {"prepared": prepared})
        stage = STAGE_BY_NAME["train_teacher"]
        outputs = {name: work / "teacher" / name for name in stage.outputs}

        def run_stage() -> None:
            execute(stage, params, {"prepared": prepared}, outputs)

        images = load_prepared(prepared).train.images.shape[0] * args.epochs
        run_stage()  # warm-up: creates the MLflow database, imports everything once
        times: dict[str, list[float]] = {"bare loop": [], "train_teacher stage": []}
        for r in range(args.rounds):
            order = [("bare loop", lambda: bare_loop(params, prepared)), ("train_teacher stage", run_stage)]
            for name, fn in order if r % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    ratios = [b / s for b, s in zip(times["bare loop"], times["train_teacher stage"], strict=True)]
    ratio = statistics.median(ratios)
    rows = [
        [name, f"{statistics.median(t):.2f}", f"{images / statistics.median(t):.0f}"]
        for name, t in times.items()
    ]
    print(markdown_table(["loop", "seconds", "images/s"], rows))
    print(f"\nstage / bare images/s: {ratio:.3f} (per round: {', '.join(f'{r:.3f}' for r in ratios)})")
    write_result(
        "train_overhead",
        {
            "images_per_epoch": images // args.epochs,
            "epochs": args.epochs,
            "rounds": args.rounds,
            "seconds": times,
            "ratio_per_round": ratios,
        },
        [target("train_teacher stage / bare loop images/s", ratio, ">=", 0.95)],
        "python -m bench.train_overhead " + " ".join(sys.argv[1:]),
    )


if __name__ == "__main__":
    main()
