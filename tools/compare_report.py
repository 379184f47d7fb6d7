"""The comparison's report: tables over teacher seeds, the paired comparison with the best data-free
baseline, and accuracy-vs-FLOPs plots, all computed from the rows `cdc compare` collected."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

STAGES = {"pruned_test": "after pruning (BN recal., no fine-tune)", "student_test": "after fine-tune"}


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    a = 100 * np.asarray(values)
    return f"{a.mean():.2f} ± {a.std(ddof=1):.2f}" if len(a) > 1 else f"{a.mean():.2f}"


def fine_tuned(row: dict) -> bool:
    return row.get("fine_tuned", True)


def matched(rows: list[dict]) -> str:
    """What the budgets match across methods: `FLOPs`, or with `cdc compare --match latency` the
    latency the table measured on this machine predicts."""
    return "predicted latency" if rows and rows[0].get("match") == "latency" else "FLOPs"


def fewer(rows: list[dict]) -> str:
    """`fewer FLOPs` or `less predicted latency`."""
    return "fewer FLOPs" if matched(rows) == "FLOPs" else f"less {matched(rows)}"


def kept(row: dict) -> float:
    """The fraction of the matched cost the cell's widths keep."""
    return row.get("kept_ratio", row["flops_ratio"])


def _by_cell(rows: list[dict]) -> dict[tuple[str, float], dict[int, dict]]:
    cells: dict[tuple[str, float], dict[int, dict]] = defaultdict(dict)
    for r in rows:
        cells[(r["method"], r["flops_removed"])][r["seed"]] = r
    return cells


def _speedup(latency: dict, removed: float) -> str:
    entry = latency.get(str(removed), {})
    parts = [f"{v['speedup']:.2f}x ± {v['spread']:.2f}" for v in entry.get("batch", {}).values()]
    return " / ".join(parts) or "–"


def method_table(rows: list[dict], methods: list, budgets: list[float], latency: dict) -> str:
    cells = _by_cell(rows)
    sizes = " / ".join(f"b{bs}" for bs in next(iter(latency.values()), {}).get("batch", {})) or "–"
    lines = [
        f"| {matched(rows)} cut (target → achieved) | method | pruned test acc (%) | pruned val acc (%) | "
        f"student test acc (%) | Δ student − teacher (points) | params cut | speed-up {sizes} | teachers |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for removed in budgets:
        for m in methods:
            runs = list(cells.get((m.name, removed), {}).values())
            if not runs:
                continue
            tuned = [r for r in runs if fine_tuned(r)]
            delta = [100 * (r["student_test"] - r["teacher_test"]) for r in tuned]
            spread = np.std(delta, ddof=1) if len(delta) > 1 else 0.0
            delta_text = f"{np.mean(delta):+.2f} ± {spread:.2f}" if delta else "–"
            lines.append(
                f"| {100 * removed:.0f}% → {100 * (1 - kept(runs[0])):.1f}% | {m.label} | "
                f"{_mean_std([r['pruned_test'] for r in runs])} | "
                f"{_mean_std([r['pruned_val'] for r in runs])} | "
                f"{_mean_std([r['student_test'] for r in tuned])} | {delta_text} | "
                f"{100 * (1 - runs[0]['params_ratio']):.1f}% | {_speedup(latency, removed)} | {len(runs)} |"
            )
    return "\n".join(lines)


def latency_text(latency: dict) -> str:
    if not latency:
        return "Speed-ups were not measured (run the comparison without `--report-only`)."
    entry = next(iter(latency.values()))
    return (
        "Speed-up: the pruned architecture's latency against the teacher's, BN folded, timed by "
        f"`cdc.latency` ({entry['rounds']} interleaved rounds of {entry['block_ms']:.0f} ms blocks, "
        f"{entry['threads']} threads, median of the "
        "per-round ratios ± half their interquartile range) after all cells had finished, with nothing "
        "else running. Latency depends on the widths only and every method of a budget has the same "
        "widths, so one measurement per budget serves all its methods."
    )


def paired_table(rows: list[dict], methods: list, budgets: list[float]) -> str:
    """Each non-baseline method against the best data-free baseline of its budget (by mean student
    accuracy), paired by teacher: mean difference and its std across teachers, both stages."""
    cells = _by_cell(rows)
    baselines = [m for m in methods if m.data_free]
    lines = [
        f"| {matched(rows)} cut | method | best data-free baseline | Δ after pruning (points) | "
        "Δ after fine-tune (points) | teachers where the method wins (after fine-tune, else after pruning) |",
        "|---|---|---|---|---|---|",
    ]
    for removed in budgets:
        present = [b for b in baselines if cells.get((b.name, removed))]
        if not present:
            continue

        def accuracy(b, removed=removed) -> float:
            runs = list(cells[(b.name, removed)].values())
            key = "student_test" if all(fine_tuned(r) for r in runs) else "pruned_test"
            return float(np.mean([r[key] for r in runs]))

        best = max(present, key=accuracy)
        base = cells[(best.name, removed)]
        for m in methods:
            if m.data_free or not cells.get((m.name, removed)):
                continue
            runs = cells[(m.name, removed)]
            seeds = sorted(set(runs) & set(base))
            cols = []
            tuned = [s for s in seeds if fine_tuned(runs[s]) and fine_tuned(base[s])]
            for key, paired in (("pruned_test", seeds), ("student_test", tuned)):
                d = np.array([100 * (runs[s][key] - base[s][key]) for s in paired])
                spread = d.std(ddof=1) if len(d) > 1 else 0.0
                cols.append(f"{d.mean():+.2f} ± {spread:.2f}" if len(d) else "–")
            key = "student_test" if tuned else "pruned_test"
            wins = sum(runs[s][key] > base[s][key] for s in (tuned or seeds))
            lines.append(
                f"| {100 * removed:.0f}% | {m.label} | {best.label} | {cols[0]} | {cols[1]} | "
                f"{wins}/{len(seeds)} |"
            )
    return "\n".join(lines)


def plot_fine_tuned(rows: list[dict], methods: list, budgets: list[float], path: Path) -> None:
    """After fine-tune, one panel per fine-tuned budget: each method's mean ± std over teachers (methods
    fine-tuned at too few budgets for a curve)."""
    cells = _by_cell(rows)
    fig = Figure(figsize=(7, 1.2 + 0.35 * len(methods) * len(budgets)))
    axes = fig.subplots(len(budgets), 1, squeeze=False)[:, 0]
    for ax, removed in zip(axes, budgets, strict=True):
        labels, means, stds = [], [], []
        for m in methods:
            runs = [r for r in cells.get((m.name, removed), {}).values() if fine_tuned(r)]
            if runs:
                labels.append(m.label)
                means.append(100 * np.mean([r["student_test"] for r in runs]))
                stds.append(100 * np.std([r["student_test"] for r in runs]))
        y = np.arange(len(labels))[::-1]
        ax.errorbar(means, y, xerr=stds, fmt="o", capsize=3)
        ax.set_yticks(y, labels, fontsize=8)
        teachers = [r["teacher_test"] for r in rows]
        ax.axvline(100 * np.mean(teachers), color="k", lw=0.8, ls=":", label="teacher (mean)")
        ax.set_title(
            f"after fine-tune, {100 * removed:.0f}% {fewer(rows)}: mean ± std over teachers",
            fontsize=9,
        )
        ax.set_xlabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot(rows: list[dict], methods: list, key: str, title: str, path: Path) -> None:
    cells = _by_cell(rows)
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    colors, markers = colormaps["tab20"].colors, "osD^vP*Xhp<>"
    for i, m in enumerate(methods):
        if key == "pruned_test" and any(m.prunes_like(o) for o in methods[:i]):
            continue  # the same channels as an earlier method: the same points
        xs, ys, es = [], [], []
        for removed in sorted({r["flops_removed"] for r in rows}):
            runs = [
                r for r in cells.get((m.name, removed), {}).values() if key == "pruned_test" or fine_tuned(r)
            ]
            if runs:
                xs.append(100 * kept(runs[0]))
                ys.append(100 * np.mean([r[key] for r in runs]))
                es.append(100 * np.std([r[key] for r in runs]))
        if xs:
            ax.errorbar(
                xs, ys, yerr=es, capsize=3, label=m.label, color=colors[(2 * i) % 20 + (i // 10) % 2],
                marker=markers[i % len(markers)], ls="--" if m.data_free else "-",
            )  # fmt: skip
    teachers = [r["teacher_test"] for r in rows]
    ax.axhline(100 * np.mean(teachers), color="k", lw=0.8, ls=":", label="teacher (mean)")
    ax.set_xlabel(f"{matched(rows)} kept (% of the teacher)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


DEFAULT_VARIANT = "symdiv (default: eval BN, post-ReLU, eps 0.05, hierarchical)"


def factors_table(result: dict) -> str:
    """Each scoring variant's accuracy after pruning, mean over the teachers, and its paired Δ (mean ±
    std over teachers, test accuracy, points) to the default symdiv, the best data-free criterion and
    random, per kind of teacher."""
    rows = result["rows"]
    lines = [
        "| teacher | variant | val acc (%) | test acc (%) | Δ vs default symdiv | "
        "Δ vs best of l1/bn_gamma | Δ vs random (mean of 3 draws) |",
        "|---|---|---|---|---|---|---|",
    ]
    for teacher in dict.fromkeys(r["teacher"] for r in rows):
        acc: dict[str, dict[int, dict]] = defaultdict(dict)
        for r in rows:
            if r["teacher"] == teacher:
                acc[r["variant"]][r["seed"]] = r
        seeds = sorted(acc["l1"])
        teacher_acc = 100 * np.mean([acc["l1"][s]["teacher_test"] for s in seeds])

        def mean(variant: str, key: str = "test", acc=acc, seeds=seeds) -> float:
            return 100 * float(np.mean([acc[variant][s][key] for s in seeds]))

        def delta(variant: str, other: str, acc=acc, seeds=seeds) -> str:
            d = np.array([100 * (acc[variant][s]["test"] - acc[other][s]["test"]) for s in seeds])
            return f"{d.mean():+.2f} ± {d.std(ddof=1) if len(d) > 1 else 0:.2f}"

        best_free = max(("l1", "bn_gamma"), key=mean)
        for variant in acc:
            lines.append(
                f"| {teacher} ({teacher_acc:.2f}%) | {variant} | {mean(variant, 'val'):.2f} | "
                f"{mean(variant):.2f} | {delta(variant, DEFAULT_VARIANT)} | "
                f"{delta(variant, best_free)} ({best_free}) | {delta(variant, 'random')} |"
            )
    return "\n".join(lines)


def factors_section(path: Path) -> str:
    if not path.exists():
        return ""
    result = json.loads(path.read_text())
    minutes, removed = result["seconds"] / 60, 100 * result["flops_removed"]
    return f"""
## What decides the ranking

Produced by `{result["command"].strip()}` on {result["date"]}
({result["machine"]}, {minutes:.0f} min) on the teachers above, at {removed:.0f}% fewer FLOPs
(uniform ratio {result["uniform_ratio"]}; the `global` rows keep the same FLOPs with one threshold
over all layers): accuracy after pruning (BN recalibrated, no fine-tune), one factor changed at a
time; retrained teachers go through the real `train_teacher` stage with only `weight_decay` changed.
JSON: `bench/results/ranking_factors.json`.

{factors_table(result)}
"""


def write_report(rows: list[dict], methods: list, out: Path, meta: dict) -> None:
    budgets = sorted({r["flops_removed"] for r in rows})
    plot_dir = out.parent / "results"
    plot_dir.mkdir(parents=True, exist_ok=True)
    name = meta["profile"]
    rows_file = meta.get("rows", f"compare_{name}.json")
    prefix = Path(rows_file).stem.removeprefix("compare_")  # the plots' names: the profile, how matched
    plot(rows, methods, "pruned_test", f"{STAGES['pruned_test']}, mean ± std over teachers",
         plot_dir / f"{prefix}_pruned_test.png")  # fmt: skip
    # curves for the methods fine-tuned at several budgets, every method at the budgets all are fine-tuned at
    curves = [
        m
        for m in methods
        if len({r["flops_removed"] for r in rows if r["method"] == m.name and fine_tuned(r)}) > 1
    ]
    plots = [f"![after pruning](results/{prefix}_pruned_test.png)"]
    if curves:
        plot(rows, curves, "student_test", "after fine-tune, mean ± std over teachers",
             plot_dir / f"{prefix}_student_test.png")  # fmt: skip
        plots.append(f"![after fine-tune](results/{prefix}_student_test.png)")
    common = meta.get("finetune_removed") or []
    if common:
        plot_fine_tuned(rows, methods, common, plot_dir / f"{prefix}_student_test_all.png")
        plots.append(f"![after fine-tune, every method](results/{prefix}_student_test_all.png)")
    latency = meta.get("latency", {})
    rerun = [r for r in rows if "replaces_pruned_test" in r]
    same = sum(r["replaces_pruned_test"] == r["pruned_test"] for r in rerun)
    reproduced = (
        f" {len(rerun)} cells were run twice (pruned only, then again with the fine-tune a later profile "
        f"added): the pruned model's test accuracy was the same both times in {same} of them."
        if rerun
        else ""
    )
    tuned_budgets = ", ".join(f"{100 * b:.0f}%" for b in common) or "no budget"
    everywhere = (
        ", ".join(m.label for m in methods if m.name in meta.get("finetune_everywhere", [])) or "no method"
    )
    teachers = {r["seed"]: r["teacher_test"] for r in rows}
    wall = sum(r["wall_s"] for r in rows)
    jobs = len(teachers)
    teacher_text = ", ".join(f"seed {s}: {100 * a:.2f}%" for s, a in sorted(teachers.items()))
    text = f"""# Method comparison at matched budgets

Produced by `{meta["command"]}` on {meta["date"]} ({meta["machine"]}); {len(rows)} cells whose
wall times sum to {wall / 60:.0f} min, {jobs} teachers' cells running at once. Profile `{name}`:
{meta["about"]}. Raw rows: `docs/results/{rows_file}`.{reproduced}

Each fine-tuned cell is a `dvc repro` of the whole pipeline; a cell without fine-tune is
`dvc repro prune` followed by the evaluate stage's own BN recalibration and accuracy functions (a
test pins them to the stage's output). Within a budget every method prunes to the *same widths* (one
uniform per-layer ratio solved for the {matched(rows)} target), so FLOPs, params and latency are
identical across methods; every fine-tuned method gets the same fine-tune (epochs, schedule, seed):
KD + DCA as in CDC, except "CDC without DCA" (KD only) and the cross-entropy-only row (labels only: the three
distillation modes of the ablation on the same pruned models). Every method is fine-tuned at
{tuned_budgets} {fewer(rows)}; {everywhere} at every budget. Teachers' test accuracy: {teacher_text}.
Accuracies are mean ± std over the teachers; Δ is computed per teacher, then averaged.

Profile params over the defaults:

```json
{json.dumps(meta["params"])}
```

## Accuracy per method and budget

{method_table(rows, methods, budgets, latency)}

{latency_text(latency)}

## Paired with the best data-free baseline

The best data-free baseline of a budget (highest mean accuracy of `l1`, `bn_gamma`, `random`, after
fine-tune where there is one), against each other method, paired by teacher: mean ± std over the
teachers of the difference in test accuracy.

{paired_table(rows, methods, budgets)}

## Plots

{chr(10).join(plots)}
"""
    notes = out.parent / "results_notes.md"  # the hand-written reading of the tables, kept with them
    factors = Path(__file__).resolve().parents[1] / "bench" / "results" / "ranking_factors.json"
    text += factors_section(factors)
    if notes.exists():
        text += "\n" + notes.read_text()
    out.write_text(text)
