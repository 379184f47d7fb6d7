"""The stage list, declared once: the CLI, `dvc.yaml` and the Kubeflow pipeline are built from it.

Each stage names its inputs and outputs (name -> default path) and the params.yaml sections it reads.
`tests/test_stages.py` proves the committed dvc.yaml describes exactly this DAG.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PREPARED = "data/prepared"
TEACHER = "data/teacher/model.pt"
PRUNED = "data/prune/model.pt"


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    inputs: dict[str, str]
    outputs: dict[str, str]
    params: tuple[str, ...]
    metrics: tuple[str, ...] = ()  # outputs that are DVC metrics (small JSON, not cached)
    plots: tuple[str, ...] = ()  # outputs that are DVC plots
    persist: tuple[str, ...] = ()  # outputs kept across runs (resume checkpoints), not cached
    flags: dict[str, str] = field(default_factory=dict)  # extra boolean CLI flags -> help

    @property
    def module(self) -> str:
        return f"components.{self.name}"


STAGES: list[Stage] = [
    Stage(
        "prepare",
        "Split the raw dataset into train/validation/test .npz files with normalization metadata.",
        inputs={"raw": "data/raw"},
        outputs={"prepared": PREPARED},
        params=("seed", "data"),
    ),
    Stage(
        "train_teacher",
        "Train the full network with SGD, validating every epoch and checkpointing for --resume.",
        inputs={"prepared": PREPARED},
        outputs={
            "model": TEACHER,
            "history": "data/teacher/history.csv",
            "metrics": "data/teacher/metrics.json",
            "checkpoints": "data/teacher/checkpoints",
        },
        params=("seed", "train_teacher"),
        metrics=("metrics",),
        plots=("history",),
        persist=("checkpoints",),
        flags={"resume": "continue from the last epoch checkpoint instead of starting over"},
    ),
    Stage(
        "dump_stats",
        "Stream the training split through the teacher; write per-layer/channel/class sums to Parquet.",
        inputs={"prepared": PREPARED, "teacher": TEACHER},
        outputs={"stats": "data/stats/stats.parquet", "confusion": "data/stats/confusion.json"},
        params=("dump_stats",),
    ),
    Stage(
        "score",
        "Cluster the confusion matrix into coarse classes and score every channel hierarchically.",
        inputs={"stats": "data/stats/stats.parquet", "confusion": "data/stats/confusion.json"},
        outputs={"scores": "data/score/scores.parquet", "groups": "data/score/groups.json"},
        params=("seed", "score"),
    ),
    Stage(
        "prune",
        "Physically remove the lowest-scored channels of each layer under the budget.",
        inputs={"prepared": PREPARED, "teacher": TEACHER, "scores": "data/score/scores.parquet"},
        outputs={"model": PRUNED, "report": "data/prune/report.json"},
        params=("prune",),
    ),
    Stage(
        "fit_dca",
        "Fit sign-aligned DCA bases of an intermediate layer for the teacher and the pruned student.",
        inputs={
            "prepared": PREPARED,
            "teacher": TEACHER,
            "pruned": PRUNED,
            "groups": "data/score/groups.json",
        },
        outputs={"dca": "data/dca/dca.npz"},
        params=("seed", "fit_dca"),
    ),
    Stage(
        "distill",
        "Fine-tune the pruned student with cross-entropy, KD and the DCA feature loss.",
        inputs={"prepared": PREPARED, "teacher": TEACHER, "pruned": PRUNED, "dca": "data/dca/dca.npz"},
        outputs={
            "model": "data/student/model.pt",
            "history": "data/student/history.csv",
            "metrics": "data/student/metrics.json",
        },
        params=("seed", "distill"),
        metrics=("metrics",),
        plots=("history",),
    ),
    Stage(
        "evaluate",
        "Report test accuracy, FLOPs, params and latency of teacher, pruned and student.",
        inputs={
            "prepared": PREPARED,
            "teacher": TEACHER,
            "pruned": PRUNED,
            "student": "data/student/model.pt",
            "teacher_history": "data/teacher/history.csv",
            "student_history": "data/student/history.csv",
            "prune_report": "data/prune/report.json",
        },
        outputs={
            "metrics": "data/evaluate/metrics.json",
            "report": "data/evaluate/report.md",
            "plots": "data/evaluate/plots",
        },
        params=("seed", "evaluate"),
        metrics=("metrics",),
    ),
]

STAGE_BY_NAME = {s.name: s for s in STAGES}


def option(name: str) -> str:
    return "--" + name.replace("_", "-")


def command(stage: Stage) -> str:
    """The shell command that runs `stage` on its default paths."""
    args = [f"{option(k)} {v}" for k, v in {**stage.inputs, **stage.outputs}.items()]
    return " ".join(["cdc", stage.name, *args])


def dvc_yaml() -> dict:
    """The `dvc.yaml` content that wires STAGES."""
    stages = {}
    for s in STAGES:
        outs: list = []
        for name, path in s.outputs.items():
            if name in s.metrics or name in s.persist:
                continue
            outs.append(path)
        for name in s.persist:
            outs.append({s.outputs[name]: {"persist": True, "cache": False}})
        entry: dict = {
            "cmd": command(s),
            "deps": sorted(set(s.inputs.values())),
            "params": list(s.params),
            "outs": outs,
        }
        if s.metrics:
            entry["metrics"] = [{s.outputs[n]: {"cache": False}} for n in s.metrics]
        stages[s.name] = entry
    plots = []
    for s in STAGES:
        for n in s.plots:
            plots.append({s.outputs[n]: {"x": "epoch", "y": ["val_acc", "train_acc"]}})
    plots.append("data/evaluate/plots")
    return {"stages": stages, "plots": plots}
