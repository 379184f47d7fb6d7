"""The stage list, declared once: the CLI, `dvc.yaml` and the Kubeflow pipeline are built from it.
Beside it, one module per stage (`components/stages/<name>.py`, its `run(params, inputs, outputs, tracker)`).

Each stage names its inputs and outputs (name -> default path), the kind of each output (the typed
artifact it becomes in Kubeflow) and the params.yaml sections it reads; a stage that reads `runtime`
runs a model and gets a GPU on a cluster. `tests/test_params_and_stages.py` proves the committed
dvc.yaml describes exactly this DAG, `tests/test_kfp.py` that the Kubeflow pipeline does.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

PREPARED = "data/prepared"
TEACHER = "data/teacher/model.pt"
PRUNED = "data/prune/model.pt"
LATENCY_TABLE = "data/latency/table.json"
RAW = "data/raw"
RUNTIME = "runtime"  # the params section of the stages that run a model (device, mixed precision)
RESTART = "ignore the checkpoints of an unfinished run and start over"
SYNC_BN = "with several CUDA processes (--nproc): SyncBatchNorm, BN statistics over the global batch"
ARTIFACT_KINDS = ("dataset", "model", "metrics", "markdown", "artifact")


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    inputs: dict[str, str]
    outputs: dict[str, str]
    kinds: dict[str, str]  # output name -> one of ARTIFACT_KINDS
    # params.yaml sections, or a section's key (`prune.budget`) where the stage reads only that one: DVC
    # reruns the stage when one of these changes
    params: tuple[str, ...]
    # DVC metrics and plot sources: small files kept by git under metrics/, not by the DVC cache, so
    # `dvc exp show`, `dvc metrics diff` and `dvc plots diff` read them at any revision or experiment
    metrics: tuple[str, ...] = ()
    plots: tuple[str, ...] = ()
    persist: tuple[str, ...] = ()  # outputs kept across runs (resume checkpoints), not cached
    flags: dict[str, str] = field(default_factory=dict)  # extra boolean CLI flags -> help
    # inputs whose path is a param (input name -> dotted params key): dvc.yaml reads it from params.yaml
    param_paths: dict[str, str] = field(default_factory=dict)
    # runs as several processes under torchrun (`--nproc`): sharded sums or DistributedDataParallel
    distributed: bool = False
    # a stage that runs on a device of its own (not `runtime`'s): the params key naming it
    device_key: str | None = None

    def __post_init__(self) -> None:
        if set(self.kinds) != set(self.outputs) or not set(self.kinds.values()) <= set(ARTIFACT_KINDS):
            raise ValueError(f"stage {self.name}: give every output one kind of {ARTIFACT_KINDS}")
        names = [*self.inputs, *self.outputs, *self.flags, *self.params]
        if len(set(names)) < len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(
                f"stage {self.name}: {twice} named twice among its inputs, outputs, flags and params "
                "sections; each is one argument of the stage's command and of its Kubeflow component"
            )

    @property
    def module(self) -> str:
        return f"components.stages.{self.name}"

    @property
    def sections(self) -> tuple[str, ...]:
        """The params sections the stage reads keys of (what its Kubeflow component takes)."""
        return tuple(dict.fromkeys(p.split(".")[0] for p in self.params))

    @property
    def runs_model(self) -> bool:
        """Whether the stage runs a network (the `runtime` device applies; a GPU pays off)."""
        return RUNTIME in self.params


STAGES: list[Stage] = [
    Stage(
        "prepare",
        "Split the raw dataset (data.root) into train/validation/test with normalization metadata: .npz "
        "arrays, or for a large image folder the list of its files with md5s (streamed by later stages).",
        inputs={"raw": RAW},
        outputs={"prepared": PREPARED},
        kinds={"prepared": "dataset"},
        params=("seed", "data"),
        flags={
            "embed_files": "copy a streamed image tree into the prepared dataset, so that it is read from "
            "there wherever the dataset goes (what every Kubeflow task does: its pods share no disk)"
        },
        param_paths={"raw": "data.root"},
    ),
    Stage(
        "train_teacher",
        "Train the full network with SGD, validating every epoch; a rerun resumes from the last checkpoint. "
        "With train_teacher.epochs 0, init_checkpoint is the teacher as it is (measured, not trained).",
        inputs={"prepared": PREPARED},
        outputs={
            "model": TEACHER,
            "history": "metrics/teacher_history.csv",
            "metrics": "metrics/teacher.json",
            "checkpoints": "data/teacher/checkpoints",
        },
        kinds={"model": "model", "history": "dataset", "metrics": "metrics", "checkpoints": "artifact"},
        params=("seed", "train_teacher", RUNTIME),
        metrics=("metrics",),
        plots=("history",),
        persist=("checkpoints",),
        flags={"restart": RESTART, "sync_bn": SYNC_BN},
        distributed=True,
    ),
    Stage(
        "dump_stats",
        "Stream the training split through the teacher; write per-layer/channel/class sums to Parquet.",
        inputs={"prepared": PREPARED, "teacher": TEACHER},
        outputs={
            "stats": "data/stats/stats.parquet",
            "grid": "data/stats/grid.parquet",
            "confusion": "data/stats/confusion.json",
        },
        kinds={"stats": "dataset", "grid": "dataset", "confusion": "dataset"},
        params=("dump_stats", RUNTIME),
        distributed=True,
    ),
    Stage(
        "score",
        "Cluster the confusion matrix into coarse classes and score every channel with the criterion.",
        inputs={
            "stats": "data/stats/stats.parquet",
            "grid": "data/stats/grid.parquet",
            "confusion": "data/stats/confusion.json",
            "prepared": PREPARED,
            "teacher": TEACHER,
        },
        outputs={"scores": "data/score/scores.parquet", "groups": "data/score/groups.json"},
        kinds={"scores": "dataset", "groups": "dataset"},
        params=("seed", "score", RUNTIME),
    ),
    Stage(
        "latency_table",
        "With prune.budget latency_target: time the teacher on the target (the latency section) with each "
        "prunable layer narrowed in turn, the table the budget predicts latency from; otherwise a stub.",
        inputs={"prepared": PREPARED, "teacher": TEACHER},
        outputs={"table": LATENCY_TABLE},
        kinds={"table": "artifact"},
        params=("latency", "prune.budget"),
        device_key="latency.device",
    ),
    Stage(
        "prune",
        "Physically remove the lowest-scored channels of each layer under the budget.",
        inputs={
            "prepared": PREPARED,
            "teacher": TEACHER,
            "scores": "data/score/scores.parquet",
            "latency_table": LATENCY_TABLE,
        },
        outputs={"model": PRUNED, "report": "data/prune/report.json"},
        kinds={"model": "model", "report": "artifact"},
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
        kinds={"dca": "artifact"},
        params=("seed", "fit_dca", RUNTIME),
        distributed=True,
    ),
    Stage(
        "distill",
        "Fine-tune the pruned student with cross-entropy, KD and the DCA feature loss.",
        inputs={"prepared": PREPARED, "teacher": TEACHER, "pruned": PRUNED, "dca": "data/dca/dca.npz"},
        outputs={
            "model": "data/student/model.pt",
            "history": "metrics/student_history.csv",
            "metrics": "metrics/student.json",
            "checkpoints": "data/student/checkpoints",
        },
        kinds={"model": "model", "history": "dataset", "metrics": "metrics", "checkpoints": "artifact"},
        params=("seed", "distill", RUNTIME),
        metrics=("metrics",),
        plots=("history",),
        persist=("checkpoints",),
        flags={"restart": RESTART, "sync_bn": SYNC_BN},
        distributed=True,
    ),
    Stage(
        "evaluate",
        "Report test accuracy, FLOPs, params and latency of teacher, pruned and student.",
        inputs={
            "prepared": PREPARED,
            "teacher": TEACHER,
            "pruned": PRUNED,
            "student": "data/student/model.pt",
            "teacher_history": "metrics/teacher_history.csv",
            "student_history": "metrics/student_history.csv",
            "prune_report": "data/prune/report.json",
        },
        outputs={
            "metrics": "metrics/evaluate.json",
            "report": "data/evaluate/report.md",
            "plots": "data/evaluate/plots",
        },
        kinds={"metrics": "metrics", "report": "markdown", "plots": "artifact"},
        params=("seed", "evaluate", RUNTIME),
        metrics=("metrics",),
    ),
    Stage(
        "export",
        "Export the student to ONNX and TorchScript, check both reproduce its logits, register it in MLflow.",
        inputs={"prepared": PREPARED, "student": "data/student/model.pt"},
        outputs={
            "onnx": "data/export/student.onnx",
            "torchscript": "data/export/student.torchscript.pt",
            "report": "data/export/report.json",
        },
        kinds={"onnx": "model", "torchscript": "model", "report": "artifact"},
        params=("export",),
    ),
]

STAGE_BY_NAME = {s.name: s for s in STAGES}


def option(name: str) -> str:
    return "--" + name.replace("_", "-")


def command(stage: Stage) -> str:
    """The shell command that runs `stage` on its default paths (a param's path as `${key}`, which DVC
    fills in from params.yaml)."""
    args = [f"{option(k)} {_dvc_path(stage, k, v)}" for k, v in {**stage.inputs, **stage.outputs}.items()]
    return " ".join(["cdc", stage.name, *args])


def _dvc_path(stage: Stage, name: str, default: str) -> str:
    return f"${{{stage.param_paths[name]}}}" if name in stage.param_paths else default


ROOT = Path(__file__).resolve().parents[2]
CODE_PACKAGES = ("cdc", "components")  # the code a stage runs; tools/, tests/, bench/, docs/ are not
# the user's model code and trained checkpoints (train_teacher.arch models.mynet:build, init_checkpoint
# models/teacher.pt): a dependency of every stage that builds the model, so a change reruns from there
USER_MODELS = "models"
# how a stage is started, logged and shown, not what it writes: a change there reruns nothing (the stage
# list itself is dvc.yaml's source: a change to a stage's paths or params changes dvc.yaml)
PLUMBING = (
    "components/__init__.py",
    "components/cli.py",
    "components/progress.py",
    "components/stage_server.py",
    "components/stages/__init__.py",
    "components/tracking.py",
    "components/tracking_worker.py",
)


def builds_model(stage: Stage) -> bool:
    """Whether the stage builds the network (it may be the user's code in USER_MODELS)."""
    return stage.name == "train_teacher" or "teacher" in stage.inputs


def code_dependencies(module: str) -> list[str]:
    """The repository files that stage module `module` runs: itself and every `cdc`/`components` module it
    imports, directly or through another, imports inside functions included and type-checking-only ones
    not, found by reading the sources, but the `PLUMBING` (dvc.yaml lists them, so a change reruns the
    stages that run it)."""
    found: set[str] = set()
    todo = [module]
    while todo:
        path = _module_file(todo.pop())
        if path is None or path in found or path in PLUMBING:
            continue
        found.add(path)
        todo += _imports(ast.parse((ROOT / path).read_text()))
    return sorted(found)


def _module_file(name: str) -> str | None:
    if name.split(".")[0] not in CODE_PACKAGES:
        return None
    rel = Path(*name.split("."))
    for candidate in (rel.with_suffix(".py"), rel / "__init__.py"):
        if (ROOT / candidate).is_file():
            return candidate.as_posix()
    return None


def _imports(node: ast.AST) -> list[str]:
    """Module names imported anywhere under `node` (for `from a import b`: `a` and `a.b`, which may be a
    module), but under `if TYPE_CHECKING:`."""
    if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
        return [name for child in node.orelse for name in _imports(child)]
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        return [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    return [name for child in ast.iter_child_nodes(node) for name in _imports(child)]


def dvc_yaml() -> dict:
    """The `dvc.yaml` content that wires STAGES."""
    stages = {}
    for s in STAGES:
        outs: list = []
        for name, path in s.outputs.items():
            if name in s.metrics or name in s.persist:
                continue
            outs.append({path: {"cache": False}} if name in s.plots else path)
        for name in s.persist:
            outs.append({s.outputs[name]: {"persist": True, "cache": False}})
        entry: dict = {
            "cmd": command(s),
            "deps": sorted({_dvc_path(s, k, v) for k, v in s.inputs.items()})
            + ([USER_MODELS] if builds_model(s) else [])
            + code_dependencies(s.module),
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
