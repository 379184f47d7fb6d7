"""What decides whether class discrimination beats the data-free criteria? One factor at a time.

Runs after `cdc compare` on its teachers (one per seed workspace under compare-workspace/): for each
teacher, prune-only accuracy (BN recalibrated, no fine-tune, as the comparison's "after pruning") of
CDC's scores against l1, bn_gamma and random at the same widths, while one factor of the scoring
changes from the default:

- the BN mode of the statistics pass (eval running statistics vs each batch's own, the released code),
- the scored tensor (post-ReLU vs pre-ReLU BN output),
- symdiv's ridge eps, the coarse/fine split T and the number of coarse groups,
- per-layer ranking (uniform widths) vs one global threshold at the same FLOPs,
- the teacher itself: teachers retrained through the real `train_teacher` stage without weight decay
  (weight decay shrinks unused filters, which should help l1; `--weight-decays` adds others).

Prints a table and writes bench/results/ranking_factors.json, which `cdc compare --report-only`
embeds in docs/results.md.

    python -m bench.ranking_factors [--workspace compare-workspace] [--removed 0.55]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
import yaml

from bench.common import RESULTS, machine
from cdc.criteria import weight_scores
from cdc.data import load_prepared
from cdc.flops import count_macs
from cdc.hierarchy import coarse_block_count, coarse_groups
from cdc.io import load_model, read_json
from cdc.models import PrunableNet, build_model
from cdc.params import Params
from cdc.pruning import BudgetProbe, channels_to_remove, keep_counts, prune_channels
from cdc.scoring import score_layers
from cdc.stats import collect_all_stats
from cdc.train import evaluate, recalibrate_bn
from tools.compare import METHOD_BY_NAME, PROFILES, cell_params, uniform_ratio_for
from tools.compare_report import factors_table

RANDOM_SEEDS = 3


def pruned_accuracy(
    teacher: PrunableNet, scores: list[np.ndarray], keep: list[int], data, params: Params, seed: int
) -> dict[str, float]:
    """The comparison's "after pruning" numbers: physically pruned, BN recalibrated, no fine-tune."""
    model = copy.deepcopy(teacher)
    names = [layer.name for layer in model.prunable_layers()]
    removals = {n: channels_to_remove(s, k) for n, s, k in zip(names, scores, keep, strict=True)}
    prune_channels(model, removals, data.input_shape)
    torch.manual_seed(seed)
    recal = data.batches("train", 128, shuffle=True, seed=seed)
    recalibrate_bn(model, recal, params.evaluate.bn_recalibration_batches)
    return {
        "val": evaluate(model, data.batches("val", 512)).accuracy,
        "test": evaluate(model, data.batches("test", 512)).accuracy,
    }


class Teacher:
    """One teacher of the comparison with what scoring it needs."""

    def __init__(self, ws: Path, teacher_path: Path, params: Params) -> None:
        self.params = params
        self.model, record = load_model(teacher_path)
        self.arch = record["arch"]
        self.data = load_prepared(ws / "data" / "prepared")
        self.confusion = np.asarray(read_json(ws / "data" / "stats" / "confusion.json")["matrix"])
        self.names = [layer.name for layer in self.model.prunable_layers()]
        self.widths = self.model.prunable_widths()
        self._stats: dict[tuple[str, str], tuple] = {}

    def stats(self, tensor: str = "post_relu", bn_mode: str = "eval") -> tuple:
        if (tensor, bn_mode) not in self._stats:
            batches = self.data.batches("train", 256)
            self._stats[(tensor, bn_mode)] = collect_all_stats(
                self.model, batches, self.data.num_classes, None, tensor, bn_mode
            )
        return self._stats[(tensor, bn_mode)]

    def symdiv(
        self,
        tensor: str = "post_relu",
        bn_mode: str = "eval",
        eps: float | None = None,
        t: int | None = None,
        n_coarse: int | None = None,
    ) -> list[np.ndarray]:
        p = self.params.score
        stats = self.stats(tensor, bn_mode)[0]
        groups = coarse_groups(self.confusion, n_coarse or p.n_coarse, self.params.seed)
        t = coarse_block_count(len(stats), p.coarse_blocks, p.coarse_fraction) if t is None else t
        return [ls.scores for ls in score_layers(stats, "symdiv", groups, t, self.params.seed, eps)]

    def baseline(self, name: str, seed: int = 0) -> list[np.ndarray]:
        if name == "random":
            rng = np.random.default_rng(seed)
            return [rng.random(w) for w in self.widths]
        by_layer = weight_scores(name, self.model, self.data.input_shape)
        return [by_layer[n] for n in self.names]

    def keep(self, budget: str, ratio: float, removed: float, scores: list[np.ndarray]) -> list[int]:
        shape = self.data.input_shape

        def flops(widths: list[int]) -> int:
            return count_macs(build_model(self.arch, self.data.num_classes, shape[0], list(widths)), shape)

        probe = BudgetProbe(flops, scores)
        params = {"ratio": ratio, "flops_target": 1 - removed, "round_to": 1}
        return keep_counts(budget, self.names, self.widths, params, probe)


def evaluate_variant(teacher: Teacher, scores, keep, seed) -> dict[str, float]:
    return pruned_accuracy(teacher.model, scores, keep, teacher.data, teacher.params, seed)


def variants(
    teacher: Teacher, ratio: float, removed: float, seed: int, factors: bool
) -> dict[str, dict[str, float]]:
    """Accuracy after pruning of the default symdiv and the baselines on one teacher, and with
    `factors` of every scoring variant, keyed by variant name."""
    uniform = teacher.keep("uniform", ratio, removed, [np.zeros(w) for w in teacher.widths])
    out: dict[str, dict[str, float]] = {}

    def run(name: str, scores: list[np.ndarray], keep: list[int] | None = None) -> None:
        t0 = time.perf_counter()
        out[name] = evaluate_variant(teacher, scores, keep or uniform, seed)
        print(f"    {name}: val {100 * out[name]['val']:.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)

    run("symdiv (default: eval BN, post-ReLU, eps 0.05, hierarchical)", teacher.symdiv())
    for name in ("l1", "bn_gamma"):
        run(name, teacher.baseline(name))
    randoms = []
    for s in range(RANDOM_SEEDS):
        randoms.append(evaluate_variant(teacher, teacher.baseline("random", s), uniform, seed))
    out["random"] = {k: float(np.mean([r[k] for r in randoms])) for k in ("val", "test")}
    if not factors:
        return out
    run("symdiv, batch-statistics BN", teacher.symdiv(bn_mode="batch"))
    run("symdiv, pre-ReLU tensor", teacher.symdiv(tensor="pre_relu"))
    for eps in (0.005, 0.5, 5.0):
        run(f"symdiv, eps {eps}", teacher.symdiv(eps=eps))
    blocks = len(teacher.widths)
    for t in (0, 2, blocks):
        run(f"symdiv, T = {t}", teacher.symdiv(t=t))
    for k in (2, 6):
        run(f"symdiv, {k} coarse groups", teacher.symdiv(n_coarse=k))
    for name, scores in (("symdiv", teacher.symdiv()), ("l1", teacher.baseline("l1"))):
        run(f"{name}, global ranking", scores, teacher.keep("global", ratio, removed, scores))
    return out


def retrain_teacher(ws: Path, params: dict, out: Path, weight_decay: float, threads: int) -> Path:
    """A teacher like the workspace's, with another weight decay, through the real stage."""
    params = copy.deepcopy(params)
    params["train_teacher"]["weight_decay"] = weight_decay
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.yaml").write_text(yaml.safe_dump(params))
    if not (out / "model.pt").exists():
        tracking = f"sqlite:///{out / 'mlflow.db'}"
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MLFLOW_TRACKING_URI=tracking)
        args = [sys.executable, "-m", "tools.cli", "train_teacher", "--params", str(out / "params.yaml")]
        args += ["--prepared", str(ws / "data" / "prepared"), "--model", str(out / "model.pt")]
        args += ["--history", str(out / "history.csv"), "--metrics", str(out / "metrics.json")]
        args += ["--checkpoints", str(out / "checkpoints")]
        subprocess.run(args, check=True, env=env, capture_output=True)
    return out / "model.pt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", type=Path, default=Path("compare-workspace"))
    ap.add_argument("--profile", default="default", help="the comparison's profile (default: %(default)s)")
    ap.add_argument("--removed", type=float, default=0.55, help="FLOPs removed (default: %(default)s)")
    ap.add_argument("--weight-decays", type=float, nargs="*", default=[0.0], help="retrained teachers")
    args = ap.parse_args()
    seeds = sorted(int(p.name.split("-")[1]) for p in args.workspace.glob("seed-*"))
    if not seeds:
        raise SystemExit(f"no seed workspaces under {args.workspace}: run `cdc compare` first")
    arch = PROFILES[args.profile]["params"]["train_teacher"]["arch"]
    ratio = uniform_ratio_for(arch, 10, (1, 28, 28), args.removed)
    rows = []
    start = time.perf_counter()
    for seed in seeds:
        ws = args.workspace / f"seed-{seed}"
        # the comparison's params of this teacher (the workspace's params.yaml changes with every cell)
        raw_params = cell_params(PROFILES[args.profile], METHOD_BY_NAME["cdc"], seed, ratio)
        params = Params.model_validate(raw_params)
        teachers = {f"default (wd {params.train_teacher.weight_decay})": ws / "data" / "teacher" / "model.pt"}
        for wd in args.weight_decays:
            out = args.workspace / "factors" / f"seed-{seed}-wd-{wd}"
            teachers[f"wd {wd}"] = retrain_teacher(ws, raw_params, out, wd, torch.get_num_threads())
        for label, path in teachers.items():
            print(f"seed {seed}, teacher {label}", flush=True)
            teacher = Teacher(ws, path, params)
            teacher_acc = evaluate(teacher.model, teacher.data.batches("test", 512)).accuracy
            factors = label.startswith("default")  # retrained teachers: the criteria only
            for variant, acc in variants(teacher, ratio, args.removed, seed, factors).items():
                row = {"seed": seed, "teacher": label, "teacher_test": teacher_acc, "variant": variant}
                rows.append({**row, **acc})
    result = {
        "date": date.today().isoformat(),
        "machine": machine(),
        "command": "python -m bench.ranking_factors " + " ".join(sys.argv[1:]),
        "flops_removed": args.removed,
        "uniform_ratio": ratio,
        "seconds": time.perf_counter() - start,
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ranking_factors.json").write_text(json.dumps(result, indent=1))
    print(factors_table(result))


if __name__ == "__main__":
    main()
