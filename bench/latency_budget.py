"""Does a budget in measured time buy more speed than one in FLOPs? (issue 25, item 3)

Per teacher seed, in one workspace (`cdc compare`'s, so the teacher, statistics and scores are computed
once and DVC reuses them), the real pipeline (`cdc repro evaluate`) runs CDC with the `flops_target`
budget at two FLOPs targets and with the `latency_target` budget at two latency targets, every other
setting alike (the same scores, the same fine-tune). The latency table is measured on this machine at
the budget's batch size (`latency.batch_size`, 64) in the default inference form; evaluate times every
student against its teacher interleaved at batch 1 and 64 in that form. From the rows:
(a) at the same measured latency (b64), the latency student's test accuracy against the FLOPs students'
    interpolated at its latency; (b) at the same accuracy, its measured speed-up against theirs.
Goal (the issue's): a latency student at >= 1.8x (b64) and >= 1.4x (b1) within 0.5 points of its
teacher, beating the FLOPs budget on (a) and (b) by more than the spread over seeds.
Runs sequentially (latency is measured in every cell: nothing else may share the CPU).
Writes bench/results/latency_budget.json and two plots under bench/results/.

    python -m bench.latency_budget [--profile default|tiny] [--seeds 0 1 2] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from matplotlib.figure import Figure

from bench.common import RESULTS, markdown_table, reported, target, write_result
from cdc.latency_model import LatencyTable
from cdc.params import Params
from tools.compare import PROFILES, make_workspace, merge

REPO = Path(__file__).resolve().parents[1]
BUDGETS = {  # budget -> the targets each seed's students are pruned to
    "flops_target": [0.25, 0.5],
    # ResNet-20 at batch 64 here: the table's floor (every layer 8 channels wide) is about 0.6
    "latency_target": [0.7, 0.8],
}
LATENCY = {"batch_size": 64, "step": 8, "rounds": 10}  # the target: this CPU, folded form
SETTINGS = {  # what the bench changes over the comparison profile's params
    "default": {"evaluate": {"latency_batch_sizes": [1, 64], "latency_rounds": 30}},
    "tiny": {"evaluate": {"latency_batch_sizes": [1, 64], "latency_rounds": 3}},
}


def cell(ws: Path, env: dict[str, str], params: dict) -> dict:
    """One student: `cdc repro evaluate` with `params`; its row from the prune report and metrics."""
    (ws / "params.yaml").write_text(
        yaml.safe_dump(Params.model_validate(params).model_dump(), sort_keys=False)
    )
    start = time.monotonic()
    cdc = Path(sys.executable).parent / "cdc"
    proc = subprocess.run([str(cdc), "repro", "evaluate"], cwd=ws, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"cdc repro failed in {ws}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    report = json.loads((ws / "data/prune/report.json").read_text())
    metrics = json.loads((ws / "metrics/evaluate.json").read_text())
    r = metrics["student_vs_teacher"]
    return {
        "widths": report["widths_after"],
        "flops_ratio": report["flops_ratio"],
        "predicted_latency_ratio": report.get("predicted_latency_ratio"),
        "teacher_test_acc": metrics["teacher"]["test_acc"],
        "student_test_acc": metrics["student"]["test_acc"],
        "acc_drop_points": r["acc_drop_points"],
        "speedup_b1": r["speedup_b1"],
        "speedup_b1_spread": r["speedup_b1_spread"],
        "speedup_b64": r["speedup_b64"],
        "speedup_b64_spread": r["speedup_b64_spread"],
        "measured_latency_ratio_b64": 1 / r["speedup_b64"],
        "wall_s": time.monotonic() - start,
    }


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """y at x on the line through the points (sorted by x); None outside their range."""
    xs, ys = zip(*sorted(points), strict=True)
    return float(np.interp(x, xs, ys)) if xs[0] <= x <= xs[-1] else None


def matched(rows: list[dict]) -> list[dict]:
    """Per seed and latency student: (a) its accuracy minus the FLOPs students' at its measured latency
    (b64), (b) its speed-up minus theirs at its accuracy (None where it lies outside their range)."""
    out = []
    for seed in sorted({r["seed"] for r in rows}):
        flops = [r for r in rows if r["seed"] == seed and r["budget"] == "flops_target"]
        for r in (r for r in rows if r["seed"] == seed and r["budget"] == "latency_target"):
            acc_f = interpolate(
                [(f["measured_latency_ratio_b64"], f["student_test_acc"]) for f in flops],
                r["measured_latency_ratio_b64"],
            )
            speed_f = interpolate(
                [(f["student_test_acc"], f["speedup_b64"]) for f in flops], r["student_test_acc"]
            )
            out.append(
                {
                    "seed": seed,
                    "latency_target": r["target"],
                    "acc_gain_points_at_same_latency": None
                    if acc_f is None
                    else 100 * (r["student_test_acc"] - acc_f),
                    "speedup_gain_b64_at_same_accuracy": None
                    if speed_f is None
                    else r["speedup_b64"] - speed_f,
                }
            )
    return out


def plot_tables(tables: dict[int, LatencyTable], path: Path) -> None:
    """Each prunable layer's row of the first seed's table: the whole model's time (fraction of the full
    model's) with that layer alone at each width."""
    table = tables[min(tables)]
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for name, steps, ms in zip(table.layers, table.steps, table.ms, strict=True):
        ax.plot(steps, [t / table.full_ms for t in ms], marker="o", label=name)
    ax.set_xlabel("kept width (channels) of the one narrowed layer")
    ax.set_ylabel("model latency / full model's")
    ax.set_title(
        f"{table.arch}, batch {table.batch}, {table.form}, {table.threads} threads ({table.machine})"
    )
    ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_students(rows: list[dict], path: Path) -> None:
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for budget, marker in (("flops_target", "s"), ("latency_target", "o")):
        pts = [r for r in rows if r["budget"] == budget]
        ax.scatter(
            [r["measured_latency_ratio_b64"] for r in pts],
            [100 * r["student_test_acc"] for r in pts],
            marker=marker,
            label=budget,
        )
    teachers = {r["seed"]: r["teacher_test_acc"] for r in rows}
    ax.scatter([1.0] * len(teachers), [100 * a for a in teachers.values()], marker="*", label="teacher")
    ax.set_xlabel("measured latency / teacher's (batch 64)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def summarize(rows: list[dict], matches: list[dict]) -> list[dict]:
    targets = []
    for budget in BUDGETS:
        for t in BUDGETS[budget]:
            cell_rows = [r for r in rows if r["budget"] == budget and r["target"] == t]
            for key in ("speedup_b64", "speedup_b1", "acc_drop_points", "flops_ratio"):
                values = [r[key] for r in cell_rows]
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                targets.append(
                    reported(
                        f"{budget} {t}: {key}",
                        statistics.mean(values),
                        f"mean over {len(values)} seeds, sd {spread:.3f}",
                    )
                )
    good = [r for r in rows if r["budget"] == "latency_target" and r["acc_drop_points"] <= 0.5]
    best = max(good, key=lambda r: r["speedup_b64"], default=None)
    note = "" if best else "no latency student within 0.5 points"
    figure = "latency student within 0.5 points of its teacher, the fastest"
    targets.append(target(f"{figure}: speedup_b64", best["speedup_b64"] if best else 0, ">=", 1.8, note))
    targets.append(target(f"{figure}: its speedup_b1", best["speedup_b1"] if best else 0, ">=", 1.4, note))
    for key, unit in (
        ("acc_gain_points_at_same_latency", "points"),
        ("speedup_gain_b64_at_same_accuracy", "x"),
    ):
        values = [m[key] for m in matches if m[key] is not None]
        if not values:
            targets.append(
                reported(f"(a)/(b) {key}", float("nan"), "no latency student inside the FLOPs range")
            )
            continue
        mean, sd = statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
        targets.append(
            target(
                f"{key} (mean - sd over seeds and targets)",
                mean - sd,
                ">=",
                0.0,
                f"mean {mean:+.3f} {unit}, sd {sd:.3f}, {len(values)} pairs",
            )
        )
    return targets


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--profile",
        choices=sorted(SETTINGS),
        default="default",
        help="the comparison's profile (cdc compare) whose data and schedule the cells use",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workdir", type=Path, default=REPO / "data" / "bench_latency_budget")
    parser.add_argument("--raw", type=Path, default=REPO / "data" / "raw")
    args = parser.parse_args()

    base = merge(PROFILES[args.profile]["params"], SETTINGS[args.profile])
    out_path = RESULTS / "latency_budget.json"
    saved = args.workdir / "rows.json"  # rows as cells finish: an interrupted run resumes
    rows: list[dict] = json.loads(saved.read_text()) if saved.exists() else []
    for seed in args.seeds:
        ws = args.workdir / f"seed{seed}"
        ws.mkdir(parents=True, exist_ok=True)
        env = make_workspace(ws, args.raw)
        for budget, values in BUDGETS.items():
            for value in values:
                if any((r["seed"], r["budget"], r["target"]) == (seed, budget, value) for r in rows):
                    continue
                prune = {"budget": budget, budget: value}
                params = merge(base, {"seed": seed, "latency": LATENCY, "prune": prune})
                row = {"seed": seed, "budget": budget, "target": value, **cell(ws, env, params)}
                if budget == "latency_target":
                    row["table"] = json.loads((ws / "data/latency/table.json").read_text())
                rows.append(row)
                saved.write_text(json.dumps(rows, indent=1))
                print(json.dumps({k: v for k, v in row.items() if k not in ("widths", "table")}), flush=True)
    tables = {r["seed"]: LatencyTable.load_record(r.pop("table")) for r in rows if "table" in r}
    matches = matched(rows)
    plot_tables(tables, RESULTS / "latency_budget_table.png")
    plot_students(rows, RESULTS / "latency_budget_students.png")
    targets = summarize(rows, matches)
    command = "python -m bench.latency_budget " + " ".join(sys.argv[1:])
    write_result(
        "latency_budget",
        {"profile": args.profile, "budgets": BUDGETS, "latency": LATENCY, "rows": rows, "matched": matches},
        targets,
        command.strip(),
    )
    header = [
        "budget",
        "target",
        "seed",
        "FLOPs",
        "predicted",
        "measured b64",
        "x b64",
        "x b1",
        "acc drop (pt)",
    ]
    print(
        markdown_table(
            header,
            [
                [
                    r["budget"],
                    r["target"],
                    r["seed"],
                    f"{r['flops_ratio']:.3f}",
                    "" if r["predicted_latency_ratio"] is None else f"{r['predicted_latency_ratio']:.3f}",
                    f"{r['measured_latency_ratio_b64']:.3f}",
                    f"{r['speedup_b64']:.2f}",
                    f"{r['speedup_b1']:.2f}",
                    f"{r['acc_drop_points']:+.2f}",
                ]
                for r in rows
            ],
        )
    )
    lines = [[t["figure"], f"{t['value']:.3f}", t["target"], t["met"], t["note"]] for t in targets]
    print(markdown_table(["figure", "value", "target", "met", "note"], lines))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
