"""`cdc compare`: the matched-budget comparison of CDC with its ablations and the usual baselines.

Every cell of {method} x {FLOPs budget} x {teacher seed} is one `dvc repro` of the real pipeline in
the workspace of its teacher seed (seeds run in parallel, the CPU threads split between them), with
the method's params written to params.yaml, so DVC reuses what the cells share (one teacher and one
statistics pass per seed; a method's scores across budgets; score/prune/fit_dca when only the
fine-tune differs). Within a budget every method prunes to the same widths (a uniform ratio solved for
the FLOPs target), so achieved FLOPs are identical across methods, and gets the same fine-tune
(epochs, schedule, seed). Each cell records the pruned model's accuracy (BN recalibrated, no fine-tune;
validation and test) and the fine-tuned student's. After the cells, each budget's pruned architecture
is timed against the teacher with nothing else running (50 blocks of 100 ms a model and batch size,
or the profile's `latency`). `docs/results.md` (tables, paired comparison
with the best data-free baseline) and its plots are written from the collected rows; rows are saved as
they come, so an interrupted comparison resumes where it stopped. Profiles: `default` (every method
fine-tuned at the middle budget, about 1 h 40 min on 2 cores), `extended` (docs/results.md: also
CDC, the candidate defaults and the baselines at every budget), `full`/`full_cifar100` (GPU size),
`tiny` (the test suite's).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import yaml

from cdc.errors import InputError
from components import stage_server

if TYPE_CHECKING:
    from cdc.latency_model import LatencyTable

log = logging.getLogger("cdc.compare")
REPO = Path(__file__).resolve().parents[1]

# What the fine-tune of a method is: the default CDC distillation (KD + DCA), or without DCA, or CE only.
FINE_TUNES = {
    "kd_dca": {"kd_weight": 1.0, "dca_weight": 0.1},
    "kd": {"kd_weight": 1.0, "dca_weight": 0.0},
    "ce": {"kd_weight": 0.0, "dca_weight": 0.0},
}


@dataclass(frozen=True)
class Method:
    name: str
    criterion: str
    hierarchy: bool
    fine_tune: str  # a FINE_TUNES key
    data_free: bool  # scores without data (the baselines the paired comparison is against)
    label: str
    overrides: dict = field(default_factory=dict)  # params over the cell's (candidate defaults)

    def prunes_like(self, other: Method) -> bool:
        """Whether the two prune the same channels (they differ at most in the fine-tune)."""
        return (self.criterion, self.hierarchy, self.overrides) == (
            other.criterion,
            other.hierarchy,
            other.overrides,
        )


METHODS = [
    Method("cdc", "symdiv", True, "kd_dca", False, "CDC: hierarchical symdiv + KD + DCA"),
    Method("symdiv_flat", "symdiv", False, "kd_dca", False, "symdiv without hierarchy"),
    Method("cdc_no_dca", "symdiv", True, "kd", False, "CDC without DCA (KD only)"),
    Method("cdc_ce", "symdiv", True, "ce", False, "CDC pruning, cross-entropy-only fine-tune"),
    Method("cdc_eps", "symdiv", True, "kd_dca", False, "CDC with symdiv ε 0.5", {"score": {"eps": 0.5}}),
    Method(
        "cdc_bn_batch",
        "symdiv",
        True,
        "kd_dca",
        False,
        "CDC, batch-statistics BN in the statistics pass",
        {"dump_stats": {"bn_mode": "batch"}},
    ),
    Method("fisher", "fisher", True, "kd_dca", False, "Fisher ratio (hierarchical)"),
    Method("di", "di", True, "kd_dca", False, "DI, pooled 4x4 grid (hierarchical)"),
    Method("l1", "l1", False, "kd_dca", True, "filter L1 norm"),
    Method("bn_gamma", "bn_gamma", False, "kd_dca", True, "BN gamma magnitude"),
    Method("taylor", "taylor", False, "kd_dca", False, "first-order Taylor"),
    Method("random", "random", False, "kd_dca", True, "random channels"),
]
METHOD_BY_NAME = {m.name: m for m in METHODS}


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# Profiles: the params every cell shares, the FLOPs removed per budget, the budgets whose cells are
# fine-tuned (elsewhere `distill.epochs: 0`: the pruned model only, so methods that differ only in
# their fine-tune share one cell), the methods fine-tuned at every budget, the teacher seeds.
PROFILES: dict[str, dict] = {
    "default": {
        "about": "2-core CPU, about 1 h 40 min: ResNet-20 on 12,000 Fashion-MNIST images, 8-epoch teachers; "
        "every method pruned at every budget and fine-tuned (2 epochs) at the middle one",
        "params": {
            "data": {"dataset": "fashion_mnist", "train_limit": 12000, "val_size": 2000, "test_limit": 5000},
            "train_teacher": {"arch": "resnet20", "epochs": 8},
            "fit_dca": {"max_images": 2000},
            "distill": {"epochs": 2, "refit_every": 1, "bn_recalibration_batches": 20},
            "evaluate": {"bn_recalibration_batches": 20, "latency_batch_sizes": [64], "latency_rounds": 5},
        },
        "flops_removed": [0.40, 0.55, 0.70],
        "finetune_removed": [0.55],
        "finetune_everywhere": [],
        "seeds": [0, 1, 2],
    },
    "tiny": {
        "about": "the test suite's smoke profile: seconds per stage",
        "params": {
            "data": {"train_limit": 600, "test_limit": 200, "val_size": 100},
            "train_teacher": {"epochs": 1, "batch_size": 64},
            "score": {"n_coarse": 3, "taylor_batches": 2},
            "fit_dca": {"max_images": 200},
            "distill": {"epochs": 1, "batch_size": 64, "refit_every": 1, "bn_recalibration_batches": 3},
            "evaluate": {"bn_recalibration_batches": 3, "latency_batch_sizes": [8], "latency_rounds": 3},
            "latency": {"batch_size": 8, "rounds": 3},  # the table of --match latency
        },
        "flops_removed": [0.5, 0.6],
        "finetune_removed": [0.5],
        "finetune_everywhere": [],
        "seeds": [0],
        "latency": {"rounds": 3, "block_ms": 20.0},  # checks the phase runs, measures nothing worth quoting
    },
    "full": {
        "about": "GPU size (not run here): ResNet-56 on CIFAR-10, paper-length schedules (method §6)",
        "params": {
            "data": {"dataset": "cifar10", "val_size": 5000},
            "train_teacher": {"arch": "resnet56", "epochs": 200, "lr": 0.1, "weight_decay": 0.0008},
            "score": {"coarse_blocks": 15},  # the released code's T = 14 (0-based): blocks 0-14 coarse
            "distill": {"epochs": 100, "lr": 0.05, "weight_decay": 0.001, "refit_every": 40},
        },
        "flops_removed": [0.40, 0.55, 0.70],
        "finetune_removed": [0.40, 0.55, 0.70],
        "finetune_everywhere": [],
        "seeds": [0, 1, 2],
    },
}
PROFILES["extended"] = PROFILES["default"] | {
    "about": "2-core CPU, about 2 h 20 min: ResNet-20 on 12,000 Fashion-MNIST images, 8-epoch teachers; "
    "every method pruned at every budget and fine-tuned (2 epochs) at the middle one, as the default "
    "profile; CDC, the candidate defaults and the baselines fine-tuned at every budget too",
    "finetune_everywhere": ["cdc", "cdc_eps", "cdc_bn_batch", "l1", "bn_gamma", "taylor", "random"],
}
PROFILES["full_cifar100"] = PROFILES["full"] | {
    "about": "GPU size (not run here): ResNet-56 on CIFAR-100, its 20 superclasses as the coarse classes",
    "params": merge(
        PROFILES["full"]["params"],
        {"data": {"dataset": "cifar100"}, "score": {"coarse_map": "cifar100_superclasses"}},
    ),
}


@cache
def _widths_flops(arch: str, num_classes: int, input_shape: tuple[int, ...], widths: tuple[int, ...]) -> int:
    from cdc.flops import count_macs
    from cdc.models import build_model

    return count_macs(build_model(arch, num_classes, input_shape[0], list(widths)), input_shape)


def uniform_ratio_for(
    arch: str,
    num_classes: int,
    input_shape: tuple[int, ...],
    removed: float,
    cost: Callable[[list[int]], float] | None = None,
) -> float:
    """The uniform per-layer removal ratio whose pruned model keeps closest to 1 - `removed` of the
    cost: FLOPs, or another function of the widths (a latency table's prediction)."""
    from cdc.models import build_model
    from cdc.pruning import keep_counts

    model = build_model(arch, num_classes, input_shape[0])
    names, widths = [layer.name for layer in model.prunable_layers()], model.prunable_widths()
    cost = cost or (lambda w: _widths_flops(arch, num_classes, input_shape, tuple(w)))
    full = cost(widths)
    best = (float("inf"), 0.0)
    for ratio in np.arange(0.0, 0.96, 0.0025):
        keep = keep_counts("uniform", names, widths, {"ratio": float(ratio), "round_to": 1})
        best = min(best, (abs(cost(keep) / full - (1 - removed)), round(float(ratio), 4)))
    return best[1]


def latency_table(profile: dict, raw: Path, path: Path) -> LatencyTable:
    """The profile architecture's latency table on this machine (the profile's `latency` params, all
    cores), measured before any cell runs and kept at `path`; a kept table of the same target is reused."""
    from cdc.device import resolve_device
    from cdc.latency_model import LatencyTable, measure_table
    from cdc.models import build_model

    arch, shape, n_classes = teacher_shape(profile, raw)
    target = cell_params(profile, METHODS[0], 0, 0.0)["latency"]
    device = resolve_device(target["device"])
    model = build_model(arch, n_classes, shape[0])
    names, widths = [layer.name for layer in model.prunable_layers()], model.prunable_widths()
    if path.exists():
        table = LatencyTable.load(path)
        if (
            table
            and table.widths == widths
            and (table.batch, table.form) == (target["batch_size"], target["form"])
        ):
            return table
    log.info("measuring the latency table of %s on %s, batch %d", arch, device, target["batch_size"])
    table = measure_table(
        lambda w: build_model(arch, n_classes, shape[0], w),
        arch, names, widths, list(shape), target["batch_size"], target["step"], target["form"],
        device=device, n_threads=target["threads"] or os.cpu_count(), rounds=target["rounds"],
    )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    table.save(path)
    return table


def cell_params(profile: dict, method: Method, seed: int, ratio: float, fine_tune: bool = True) -> dict:
    from cdc.params import Params

    over = merge(
        merge(profile["params"], method.overrides),
        {
            "seed": seed,
            "score": {"criterion": method.criterion, "hierarchy": method.hierarchy}
            # a flat method reads no coarse classes (the params refuse a coarse map it would ignore)
            | ({} if method.hierarchy else {"coarse_map": None, "coarse_blocks": None}),
            "prune": {"budget": "uniform", "ratio": ratio, "round_to": 1},
            "distill": FINE_TUNES[method.fine_tune] | ({} if fine_tune else {"epochs": 0}),
        },
    )
    return Params.model_validate(over).model_dump()


def fine_tuned_at(profile: dict, method: Method, removed: float) -> bool:
    return removed in profile["finetune_removed"] or method.name in profile.get("finetune_everywhere", ())


def teacher_shape(profile: dict, raw: Path) -> tuple[str, tuple[int, ...], int]:
    """The profile's architecture, input shape and class count (read off the raw dataset)."""
    from cdc.sources import load_raw

    defaults = cell_params(profile, METHODS[0], 0, 0.0)
    dataset = load_raw(defaults["data"]["dataset"], raw)
    return defaults["train_teacher"]["arch"], tuple(dataset.train.images.shape[1:]), len(dataset.classes)


def cells(profile: dict, methods: list[Method]) -> list[tuple[Method, float, bool]]:
    """(method, FLOPs removed, fine-tuned) of one teacher, methods outer (a method's scores serve all
    its budgets), the fine-tunes outside the profile's fine-tuned budgets last (the longest part, which
    an interrupted comparison can resume later); without fine-tune, methods that differ only in their
    fine-tune share one cell."""
    out = []
    for m in methods:
        for removed in profile["flops_removed"]:
            fine_tune = fine_tuned_at(profile, m, removed)
            pruning_twin = any(m.prunes_like(o) for o in methods[: methods.index(m)])
            if fine_tune or not pruning_twin:
                out.append((m, removed, fine_tune))
    return sorted(out, key=lambda c: c[2] and c[1] not in profile["finetune_removed"])


def copy_repository(ws: Path, skip: tuple[str, ...] = ()) -> None:
    """Copy the repository's files (tracked and untracked, not ignored) into `ws`, but those whose
    path starts with one of `skip`."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for rel in files:
        if not rel.startswith(skip) and (REPO / rel).is_file():
            (ws / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, ws / rel)


def make_workspace(ws: Path, raw: Path) -> dict[str, str]:
    """A git + DVC copy of the repository's files (code included) with the raw data, for the cells to
    run in: a comparison keeps running the code it started with."""
    fresh = not (ws / ".git").exists()
    # an existing workspace keeps its own DVC state: the repository's dvc.lock would make DVC rerun the
    # teacher (a stage with persistent checkpoints is never restored from the run cache)
    copy_repository(ws, () if fresh else ("dvc.lock", "params.yaml", "metrics/"))
    if not (ws / "data" / "raw").exists():
        shutil.copytree(raw, ws / "data" / "raw")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "CDC_"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        PYTHONPATH=str(ws),  # the workspace's copy of the code, not the (editable) checkout being edited
        MLFLOW_TRACKING_URI=f"sqlite:///{ws / 'mlflow.db'}",
        CDC_EXPERIMENT="cdc-compare",
        DVC_NO_ANALYTICS="1",
    )
    git = ["git", "-c", "user.name=cdc-compare", "-c", "user.email=cdc-compare@localhost"]
    if fresh:
        subprocess.run(["git", "init", "-q"], cwd=ws, env=env, check=True)
    subprocess.run([*git, "add", "-A"], cwd=ws, env=env, check=True)
    subprocess.run([*git, "commit", "-qm", "compare workspace", "--allow-empty"], cwd=ws, env=env, check=True)
    return env


def run_cell(ws: Path, env: dict[str, str], params: dict, fine_tune: bool) -> dict:
    """One cell: `dvc repro evaluate` with `params` (each stage logs its MLflow run); the row from its
    metrics and prune report. A cell without fine-tune stops at `prune` (`dvc repro prune`) and measures
    the pruned model with the evaluate stage's own recalibration and accuracy functions, in this process."""
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    start = time.monotonic()
    target = ["evaluate" if fine_tune else "prune"]  # not `export`: the cells register no models
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "repro", *target], cwd=ws, env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"dvc repro failed in {ws}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    report = json.loads((ws / "data" / "prune" / "report.json").read_text())
    row = {
        "flops_ratio": report["flops_ratio"],
        "params_ratio": report["params_ratio"],
        "widths": report["widths_after"],
    }
    if fine_tune:
        metrics = json.loads((ws / "metrics" / "evaluate.json").read_text())
        row |= {f"{m}_{split}": metrics[m][f"{split}_acc"] for m in MODELS for split in ("test", "val")}
    else:
        row |= prune_only_metrics(ws, params)
    row["wall_s"] = round(time.monotonic() - start, 1)
    return row


MODELS = ("teacher", "pruned", "student")


def prune_only_metrics(ws: Path, params: dict) -> dict:
    """Teacher and pruned accuracies as `evaluate` computes them (student = pruned: no fine-tune)."""
    import torch

    from cdc.data import load_prepared
    from cdc.io import load_model
    from cdc.params import Params
    from components.stages.evaluate import accuracies, recalibrate_pruned

    p = Params.model_validate(params)
    data, cpu = load_prepared(ws / "data" / "prepared"), torch.device("cpu")
    if ws not in _TEACHER_ACCURACY:  # one teacher per workspace
        teacher = load_model(ws / "data" / "teacher" / "model.pt")[0]
        _TEACHER_ACCURACY[ws] = accuracies(teacher, data, p.evaluate.batch_size, cpu)
    pruned = load_model(ws / "data" / "prune" / "model.pt")[0]
    recalibrate_pruned(pruned, data, p, cpu)
    acc = {"teacher": _TEACHER_ACCURACY[ws], "pruned": accuracies(pruned, data, p.evaluate.batch_size, cpu)}
    acc["student"] = acc["pruned"]
    return {f"{m}_{split}": acc[m][f"{split}_acc"] for m in MODELS for split in ("test", "val")}


_TEACHER_ACCURACY: dict[Path, dict] = {}


def run_matrix(
    profile_name: str,
    methods: list[Method],
    workspace: Path,
    rows_path: Path,
    raw: Path,
    jobs: int,
    table: LatencyTable | None = None,
) -> list[dict]:
    """Run the cells not yet in `rows_path`: one worker per teacher seed (its own workspace under
    `workspace`), `jobs` at a time, each with an equal share of the CPU threads. With a latency `table`,
    the budgets are fractions of its predicted latency instead of FLOPs."""
    profile = PROFILES[profile_name]
    rows = json.loads(rows_path.read_text()) if rows_path.exists() else []
    # a pruned-only row is done unless the profile now fine-tunes that cell (the fine-tuned row replaces it)
    done = {(r["method"], r["flops_removed"], r["seed"], r.get("fine_tuned", True)) for r in rows}
    arch, shape, n_classes = teacher_shape(profile, raw)
    cost = table.predict if table else None
    ratios = {
        removed: uniform_ratio_for(arch, n_classes, shape, removed, cost)
        for removed in profile["flops_removed"]
    }
    threads = max(1, (os.cpu_count() or 1) // jobs)
    import torch

    torch.set_num_threads(threads)  # the prune-only cells' evaluation runs in this process
    lock = threading.Lock()
    per_teacher = cells(profile, methods)
    total = len(profile["seeds"]) * len(per_teacher)
    to_run = sum(
        (m.name, removed, seed, tuned) not in done
        for seed in profile["seeds"]
        for m, removed, tuned in per_teacher
    )
    finished = 0

    def worker(seed: int) -> None:
        ws = workspace / f"seed-{seed}"
        ws.mkdir(parents=True, exist_ok=True)
        env = make_workspace(ws, raw)
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        with stage_server.running(env) as env:  # the cells' stages are forked from it, the code imported once
            for method, removed, fine_tune in per_teacher:
                if (method.name, removed, seed, fine_tune) not in done:
                    run_one(ws, env, seed, method, removed, fine_tune)

    def run_one(
        ws: Path, env: dict[str, str], seed: int, method: Method, removed: float, fine_tune: bool
    ) -> None:
        """One cell, its row saved at once."""
        nonlocal finished
        ratio = ratios[removed]
        row = run_cell(ws, env, cell_params(profile, method, seed, ratio, fine_tune), fine_tune)
        row.update(method=method.name, flops_removed=removed, seed=seed, ratio=ratio, threads=threads)
        row.update(fine_tuned=fine_tune)
        if table:  # `flops_removed` is then the predicted latency removed
            row.update(match="latency", kept_ratio=table.predict(row["widths"]) / table.full_ms)
        with lock:
            finished += 1
            replaced = [
                r
                for r in rows
                if (r["method"], r["flops_removed"], r["seed"]) == (method.name, removed, seed)
            ]
            for old in replaced:  # the same pruning again: a check that the cell reproduces
                log.info(
                    "seed %d, %s, %.0f%%: pruned test accuracy %.4f%% before, %.4f%% now",
                    seed, method.name, 100 * removed, 100 * old["pruned_test"], 100 * row["pruned_test"],
                )  # fmt: skip
                row["replaces_pruned_test"] = old["pruned_test"]
                rows.remove(old)
            rows.append(row)
            rows_path.parent.mkdir(parents=True, exist_ok=True)
            rows_path.write_text(json.dumps(rows, indent=1))
            log.info(
                "[%d/%d] seed %d, %s, %.0f%% fewer FLOPs%s: pruned %.2f%% (val %.2f%%), "
                "student %.2f%%, FLOPs %.3f, %.0f s",
                finished, to_run, seed, method.name, 100 * removed,
                "" if fine_tune else " (no fine-tune)",
                100 * row["pruned_test"], 100 * row["pruned_val"], 100 * row["student_test"],
                row["flops_ratio"], row["wall_s"],
            )  # fmt: skip

    log.info(
        "%d cells (%d done), %d teacher seeds, %d at a time with %d thread(s) each; workspaces under %s",
        total, total - to_run, len(profile["seeds"]), jobs, threads, workspace,
    )  # fmt: skip
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in [pool.submit(worker, seed) for seed in profile["seeds"]]:
            future.result()
    return rows


def measure_latency(
    profile: dict,
    rows: list[dict],
    raw: Path,
    batch_sizes: tuple[int, ...] = (1, 64),
) -> dict[str, dict]:
    """Speed-up over the teacher of each budget's pruned architecture, BN folded, timed after the cells
    (nothing else running) on all cores: latency depends on the widths only, and within a budget every
    method has the same widths, so one measurement per budget serves all its methods. Each model is
    timed in `rounds` blocks of `block_ms` (the profile's `latency`, default 50 of 100 ms)."""
    timing = {"rounds": 50, "block_ms": 100.0, **profile.get("latency", {})}
    rounds, block_ms = int(timing["rounds"]), float(timing["block_ms"])
    import torch

    from cdc.inference import inference_forward
    from cdc.latency import compare_latency, threads
    from cdc.models import build_model

    arch, shape, n_classes = teacher_shape(profile, raw)
    out: dict[str, dict] = {}
    with threads(os.cpu_count()) as n_threads:
        for removed in sorted({r["flops_removed"] for r in rows}):
            widths = {tuple(r["widths"]) for r in rows if r["flops_removed"] == removed}
            if len(widths) != 1:
                raise ValueError(f"{removed:.0%} fewer FLOPs: the methods' widths differ ({sorted(widths)})")
            torch.manual_seed(0)
            models = {
                "teacher": build_model(arch, n_classes, shape[0]),
                "pruned": build_model(arch, n_classes, shape[0], list(widths.pop())),
            }
            entry: dict = {"threads": n_threads, "form": "folded", "rounds": rounds, "block_ms": block_ms}
            entry["batch"] = {}
            for bs in batch_sizes:
                x = torch.randn(bs, *shape)
                forwards = {n: inference_forward(m, "folded", x, n_threads) for n, m in models.items()}
                lat = compare_latency(forwards, rounds=rounds, block_ms=block_ms)["pruned"]
                entry["batch"][str(bs)] = {"speedup": lat.speedup, "spread": lat.spread, "ms": lat.ms}
            out[str(removed)] = entry
            speedups = ", ".join(f"b{bs} {v['speedup']:.2f}x" for bs, v in entry["batch"].items())
            log.info("%.0f%% fewer FLOPs: speed-up %s", 100 * removed, speedups)
    return out


def add_compare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="run the matched-budget method comparison and write docs/results.md",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--profile", choices=sorted(PROFILES), default="default", help="default: %(default)s")
    p.add_argument(
        "--methods",
        nargs="+",
        choices=[m.name for m in METHODS],
        default=[m.name for m in METHODS],
        help="methods to run (default: all)",
    )
    p.add_argument(
        "--workspace",
        type=Path,
        default=Path("compare-workspace"),
        help="where the cells run (kept for DVC's caching and for resuming; default: %(default)s)",
    )
    p.add_argument(
        "--raw",
        type=Path,
        default=Path("data/raw"),
        help="the profile's raw dataset, as `data.root` reads it (the full profiles: the CIFAR archive's "
        "folder; default: %(default)s)",
    )
    p.add_argument("--out", type=Path, default=Path("docs/results.md"), help="default: %(default)s")
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="teacher seeds run at once, each in its own workspace with cores/jobs threads "
        "(default: all seeds of the profile)",
    )
    p.add_argument(
        "--match",
        choices=("flops", "latency"),
        default="flops",
        help="what each budget is a fraction of: FLOPs, or the latency a table measured on this machine "
        "predicts (the profile's `latency` params: batch size, form; rows in compare_<profile>_latency_"
        "matched.json, the table beside them); default: %(default)s",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="only rewrite the report from the saved rows, with the date, machine and command their run "
        "recorded (compare_<profile>_run.json)",
    )


def run_compare(args: argparse.Namespace) -> int:
    from cdc.device import machine_description
    from tools.compare_report import write_report

    profile = PROFILES[args.profile]
    suffix = "_latency_matched" if args.match == "latency" else ""
    rows_path = args.out.parent / "results" / f"compare_{args.profile}{suffix}.json"
    methods = [METHOD_BY_NAME[m] for m in args.methods]
    if not args.report_only:
        if not args.raw.exists():
            raise InputError(f"raw data {args.raw} not found: run `make data` first", args.raw)
        jobs = args.jobs or len(profile["seeds"])
        table = None
        if args.match == "latency":
            table = latency_table(
                profile, args.raw.resolve(), rows_path.with_name(f"{rows_path.stem}_table.json")
            )
        run_matrix(
            args.profile, methods, args.workspace.resolve(), rows_path, args.raw.resolve(), jobs, table
        )
    rows = json.loads(rows_path.read_text())
    latency_path = rows_path.with_name(f"{rows_path.stem}_latency.json")
    # who produced the rows: recorded by the run, so a rewritten report keeps the run's date and machine
    run_path = rows_path.with_name(f"{rows_path.stem}_run.json")
    if not args.report_only:
        latency_path.write_text(json.dumps(measure_latency(profile, rows, args.raw.resolve()), indent=1))
        command = f"cdc compare --profile {args.profile}" + (
            "" if len(methods) == len(METHODS) else " --methods " + " ".join(args.methods)
        )
        command += "" if args.match == "flops" else " --match latency"
        run = {"date": date.today().isoformat(), "machine": machine_description(), "command": command}
        run_path.write_text(json.dumps(run, indent=1) + "\n")  # read back below, as --report-only does
    elif not run_path.exists():
        raise InputError(
            f"{run_path} not found: the date and machine of the rows in {rows_path} are unknown; "
            "run the comparison without --report-only",
            run_path,
        )
    latency = json.loads(latency_path.read_text()) if latency_path.exists() else {}
    run = json.loads(run_path.read_text())
    meta = {
        **run,
        "profile": args.profile,
        "rows": rows_path.name,
        "about": profile["about"],
        "finetune_removed": profile["finetune_removed"],
        "finetune_everywhere": [m for m in profile.get("finetune_everywhere", []) if m in args.methods],
        "params": profile["params"],
        "latency": latency,
    }
    write_report(rows, [m for m in METHODS if m.name in args.methods], args.out, meta)
    log.info("wrote %s", args.out)
    return 0
