"""Does the student's FLOPs cut become a latency cut? Teacher vs pruned widths, per inference form.

efficiency = (1 - student latency / teacher latency) / (1 - student FLOPs / teacher FLOPs): 1 means the
time falls exactly as much as the FLOPs. Targets: >= 0.8 at batch 64, >= 0.6 at batch 1 (best form).
Students: the default uniform budget (`prune.ratio`), its widths unrounded and rounded to multiples
(`prune.round_to`), and a per-layer budget that keeps 16-channel layers whole and cuts wider ones to 16.
Weights are freshly initialized (dense kernels do not depend on them). Every row's models are timed
interleaved in one measurement (cdc.latency) on a fixed thread count; the spread is half the
interquartile range of the per-round speed-ups; "twin" is a second student of the same widths, whose
ratio to the first must be 1 within that spread. A second table times single convolutions of the
widths involved, to show where the FLOPs cut is lost. Writes bench/results/student_speedup.json.

    python -m bench.student_speedup [--arch resnet20] [--ratio 0.53] [--round-to 1 8 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys

import torch

from bench.common import markdown_table, target, write_result
from cdc.device import resolve_device
from cdc.flops import count_macs
from cdc.inference import INFERENCE_FORMS, inference_forward
from cdc.latency import compare_latency, threads
from cdc.models import build_model
from cdc.pruning import keep_counts

INPUT_SHAPE = (1, 28, 28)
ROW_HEADER = [
    "batch",
    "form",
    "student",
    "teacher ms",
    "student ms",
    "speed-up ± spread",
    "FLOPs kept",
    "efficiency",
    "twin/student",
]


CONV_SHAPES = [(16, 16, 28), (16, 8, 28), (8, 16, 28), (32, 32, 14), (32, 15, 14), (32, 16, 14), (15, 32, 14)]


def conv_kernels(batch_size: int, rounds: int, device: torch.device) -> list[dict]:
    """Interleaved time of single 3x3 convs (in -> out channels at HxW): MACs per second by width."""
    forwards, macs = {}, {}
    for c_in, c_out, hw in CONV_SHAPES:
        conv = torch.nn.Conv2d(c_in, c_out, 3, padding=1).to(device).eval()
        x = torch.randn(batch_size, c_in, hw, hw, device=device)
        name = f"{c_in} -> {c_out} @ {hw}x{hw}"
        forwards[name] = lambda conv=conv, x=x: conv(x)
        macs[name] = batch_size * hw * hw * c_out * c_in * 9
    lat = compare_latency(forwards, rounds=rounds, device=device)
    return [{"conv": n, "ms": lat[n].ms, "gmacs": macs[n] / lat[n].ms / 1e6} for n in forwards]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--ratio", type=float, default=0.53, help="uniform removal ratio (params default)")
    parser.add_argument("--round-to", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--forms", nargs="+", default=list(INFERENCE_FORMS), choices=INFERENCE_FORMS)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--device", default="cpu", help="cpu | cuda[:N] (onnxruntime is CPU only)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    forms = [f for f in args.forms if device.type == "cpu" or f != "onnxruntime"]

    torch.manual_seed(0)
    teacher = build_model(args.arch, 10, INPUT_SHAPE[0]).to(device).eval()
    names = [layer.name for layer in teacher.prunable_layers()]
    models = {"teacher": teacher}
    budgets = [("uniform", {"ratio": args.ratio, "round_to": m}) for m in args.round_to]
    # the same widths a uniform budget gives at round_to 16 cannot reach half the FLOPs on a 16-channel
    # stage; a per-layer budget that prunes only the wider stages can
    per_layer = [0.0 if w <= 16 else 1 - 16 / w for w in teacher.prunable_widths()]
    budgets.append(("per_layer", {"ratios": per_layer, "round_to": 16}))
    for budget, budget_params in budgets:
        widths = keep_counts(budget, names, teacher.prunable_widths(), budget_params)
        label = f"{budget} round_to {budget_params['round_to']}"
        models[f"student ({label})"] = build_model(args.arch, 10, INPUT_SHAPE[0], widths).to(device).eval()
    first = next(n for n in models if n.startswith("student ("))
    models["student twin"] = (
        build_model(args.arch, 10, INPUT_SHAPE[0], models[first].prunable_widths()).to(device).eval()
    )
    flops = {name: count_macs(m, INPUT_SHAPE) for name, m in models.items()}
    students = [n for n in models if n.startswith("student (")]

    rows, records, form_rows = [], [], []
    with threads(args.threads) as n_threads:
        for bs in args.batch_sizes:
            x = torch.randn(bs, *INPUT_SHAPE, device=device)
            # what each inference form buys: the teacher in every form, timed against itself in eager
            by_form = compare_latency(
                {form: inference_forward(teacher, form, x, n_threads) for form in forms},
                rounds=args.rounds,
                device=device,
            )
            for form, r in by_form.items():
                form_rows.append(
                    {
                        "batch_size": bs,
                        "form": form,
                        "teacher_ms": r.ms,
                        "vs_first": r.speedup,
                        "spread": r.spread,
                    }
                )
            for form in forms:
                forwards = {name: inference_forward(m, form, x, n_threads) for name, m in models.items()}
                lat = compare_latency(forwards, rounds=args.rounds, device=device)
                twin = lat["student twin"].speedup / lat[first].speedup
                for name in students:
                    r = lat[name]
                    flops_ratio = flops[name] / flops["teacher"]
                    eff = (1 - 1 / r.speedup) / (1 - flops_ratio)
                    rec = {
                        "batch_size": bs,
                        "form": form,
                        "student": name,
                        "widths": models[name].prunable_widths(),
                        "teacher_ms": lat["teacher"].ms,
                        "student_ms": r.ms,
                        "speedup": r.speedup,
                        "speedup_spread": r.spread,
                        "flops_ratio": flops_ratio,
                        "efficiency": eff,
                        "twin_ratio": twin,
                    }
                    records.append(rec)
                    rows.append(
                        [
                            bs,
                            form,
                            name,
                            f"{lat['teacher'].ms:.3f}",
                            f"{r.ms:.3f}",
                            f"{r.speedup:.2f} ± {r.spread:.2f}",
                            f"{100 * flops_ratio:.1f}%",
                            f"{eff:.2f}",
                            f"{twin:.3f}",
                        ]
                    )
                print(markdown_table(ROW_HEADER, rows[-len(students) :]), flush=True)  # progress
        conv_rows = conv_kernels(64, args.rounds, device)

    print(f"\nThe teacher in each inference form, timed interleaved (speed-up over {forms[0]}):\n")
    print(
        markdown_table(
            ["batch", "form", "teacher ms", f"speed-up over {forms[0]} ± spread"],
            [
                [
                    r["batch_size"],
                    r["form"],
                    f"{r['teacher_ms']:.3f}",
                    f"{r['vs_first']:.2f} ± {r['spread']:.2f}",
                ]
                for r in form_rows
            ],
        )
    )

    print("\n" + markdown_table(ROW_HEADER, rows))
    print(f"\nSingle 3x3 convolutions, batch 64, {device}, {args.threads} threads (where the cut is lost):\n")
    print(
        markdown_table(
            ["conv", "ms", "GMAC/s"], [[r["conv"], f"{r['ms']:.3f}", f"{r['gmacs']:.1f}"] for r in conv_rows]
        )
    )
    targets = []
    for bs, bound in ((64, 0.8), (1, 0.6)):
        cands = [r for r in records if r["batch_size"] == bs]
        if cands:
            best = max(cands, key=lambda r: r["efficiency"])
            targets.append(
                target(
                    f"student speed-up efficiency, batch {bs} ({device.type})",
                    best["efficiency"],
                    ">=",
                    bound,
                    f"{best['form']}, {best['student']}: {best['speedup']:.2f}x at "
                    f"{100 * best['flops_ratio']:.1f}% FLOPs",
                )
            )
    write_result(
        "student_speedup" if device.type == "cpu" else f"student_speedup_{device.type}",
        {
            "arch": args.arch,
            "device": str(device),
            "threads": args.threads,
            "rounds": args.rounds,
            "rows": records,
            "teacher_by_form": form_rows,
            "conv_kernels_b64": conv_rows,
        },
        targets,
        "python -m bench.student_speedup " + " ".join(sys.argv[1:]),
    )


if __name__ == "__main__":
    main()
