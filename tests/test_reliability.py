"""Reliability (issue 9): bad inputs, kills, numerical faults, lost services and safety.

Bad inputs run the real `cdc <stage>` CLI in a copy of the tiny finished workspace, with the bad file or
params passed as an argument: each must exit 2 with one line naming the file or key, no traceback, and
leave every declared output of the stage as it was. Kills run stages as processes that signal
themselves at exact points (components/checkpoint.py `failpoint`) or are killed from outside. Every case
is entered in the record that `make reliability` writes to docs/reliability.md.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from cdc.io import save_model
from cdc.models import build_model
from components import stage_server
from components.cli import main
from components.stages import STAGE_BY_NAME
from components.tracking import md5
from tests.conftest import CREDENTIAL_SENTINELS, copy_workspace
from tests.reliability_record import record
from tests.workspace import REPO, run_ok


@pytest.fixture(scope="module")
def finished(workspace, first_repro, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A copy of the tiny workspace after its `cdc repro`."""
    return copy_workspace(workspace, tmp_path_factory.mktemp("reliability") / "repo")


def state_of(paths: list[Path]) -> dict[str, str]:
    """The md5 of each path (absent: '-') and any staging leftovers next to them."""
    out = {str(p): md5(p) if p.exists() else "-" for p in paths}
    for p in paths:
        for leftover in p.parent.glob(f".{p.name}*"):
            out[str(leftover)] = "leftover"
    return out


def outputs_of(stage: str, root: Path) -> list[Path]:
    s = STAGE_BY_NAME[stage]
    return [root / p for name, p in s.outputs.items() if name not in s.persist]


# ---------------------------------------------------------------------------------------------- bad inputs


class BadInput:
    """One bad-input case: `make(tmp, repo)` writes the bad file or params and returns the CLI arguments
    after the stage name; the error line must contain every string of `expect`."""

    def __init__(
        self,
        category: str,
        case: str,
        stage: str,
        make: Callable[[Path, Path], list[str]],
        expect: tuple[str, ...],
    ) -> None:
        self.category, self.case, self.stage, self.make, self.expect = category, case, stage, make, expect

    def __repr__(self) -> str:
        return self.case


def params_with(change: Callable[[dict], None]) -> Callable[[Path, Path], list[str]]:
    """A params file: the workspace's with `change` applied."""

    def make(tmp: Path, repo: Path) -> list[str]:
        params = yaml.safe_load((repo / "params.yaml").read_text())
        change(params)
        (tmp / "params.yaml").write_text(yaml.safe_dump(params))
        return ["--params", str(tmp / "params.yaml")]

    return make


def setting(section: str, key: str, value: object) -> Callable[[dict], None]:
    def change(params: dict) -> None:
        params[section][key] = value

    return change


def settings(**changes: dict) -> Callable[[dict], None]:
    def change(params: dict) -> None:
        for section, values in changes.items():
            params[section].update(values)

    return change


def raw_params(text: str) -> Callable[[Path, Path], list[str]]:
    def make(tmp: Path, repo: Path) -> list[str]:
        (tmp / "params.yaml").write_text(text)
        return ["--params", str(tmp / "params.yaml")]

    return make


def bad_file(
    option: str, name: str, write: Callable[[Path, Path], None]
) -> Callable[[Path, Path], list[str]]:
    """The input `option` replaced by `tmp/name`, written by `write(path, repo)`."""

    def make(tmp: Path, repo: Path) -> list[str]:
        path = tmp / name
        write(path, repo)
        return [option, str(path)]

    return make


def from_repo(rel: str, edit: Callable[[bytes], bytes]) -> Callable[[Path, Path], None]:
    def write(path: Path, repo: Path) -> None:
        path.write_bytes(edit((repo / rel).read_bytes()))

    return write


def model_file(arch: str, num_classes: int, in_channels: int, widths: list[int] | None = None):
    def write(path: Path, repo: Path) -> None:
        torch.manual_seed(0)
        save_model(path, build_model(arch, num_classes, in_channels, widths), arch, num_classes, in_channels)

    return write


def weights_of_other_widths(path: Path, repo: Path) -> None:
    record_ = torch.load(repo / "data/teacher/model.pt", weights_only=True)
    record_["widths"] = [w // 2 for w in record_["widths"]]  # the state dict keeps the full widths
    torch.save(record_, path)


def prepared_copy(edit: Callable[[Path], None]) -> Callable[[Path, Path], list[str]]:
    def make(tmp: Path, repo: Path) -> list[str]:
        prepared = tmp / "prepared"
        shutil.copytree(repo / "data/prepared", prepared)
        edit(prepared)
        return ["--prepared", str(prepared)]

    return make


def relabel(split: str, labels: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], None]:
    def edit(prepared: Path) -> None:
        with np.load(prepared / f"{split}.npz") as z:
            images, old = z["images"], z["labels"]
        np.savez(prepared / f"{split}.npz", images=images, labels=labels(old))

    return edit


def edit_meta(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(prepared: Path) -> None:
        meta = json.loads((prepared / "meta.json").read_text())
        change(meta)
        (prepared / "meta.json").write_text(json.dumps(meta))

    return edit


def parquet(table: pa.Table) -> Callable[[Path, Path], None]:
    def write(path: Path, repo: Path) -> None:
        pq.write_table(table, path)

    return write


def stats_without_last_layer(path: Path, repo: Path) -> None:
    table = pq.read_table(repo / "data/stats/stats.parquet")
    last = max(table.column("layer_index").to_pylist())
    pq.write_table(table.filter(pa.compute.not_equal(table.column("layer_index"), last)), path)


def scores_renamed(path: Path, repo: Path) -> None:
    table = pq.read_table(repo / "data/score/scores.parquet")
    names = [f"other.{n}" for n in table.column("layer").to_pylist()]
    pq.write_table(table.set_column(0, "layer", pa.array(names)), path)


def json_text(text: str) -> Callable[[Path, Path], None]:
    def write(path: Path, repo: Path) -> None:
        path.write_text(text)

    return write


def npz(**arrays: np.ndarray) -> Callable[[Path, Path], None]:
    def write(path: Path, repo: Path) -> None:
        with path.open("wb") as fh:
            np.savez(fh, **arrays)

    return write


def half(data: bytes) -> bytes:
    return data[: len(data) // 2]


RANDOM = np.random.default_rng(9).integers(0, 256, 4096, dtype=np.uint8).tobytes()

P, F = "params", "input files"
BAD_INPUTS = [
    # params: read before any stage work, and the rules that need the model or the dataset
    BadInput(
        P,
        "YAML syntax error",
        "train_teacher",
        raw_params("seed: 0\nprune: {ratio: 0.5\n"),
        ("YAML syntax error", "line"),
    ),
    BadInput(
        P,
        "a section given twice (YAML would keep the last: every other prune key back to its default)",
        "prune",
        lambda t, r: raw_params((r / "params.yaml").read_text() + "prune:\n  ratio: 0.9\n")(t, r),
        ("'prune' is given twice", "line"),
    ),
    BadInput(
        P,
        "--nproc 0",
        "dump_stats",
        lambda t, r: ["--nproc", "0"],
        ("--nproc", ">= 1", "got '0'"),
    ),
    BadInput(
        P,
        "params file is a list, not sections",
        "train_teacher",
        raw_params("- seed\n- 0\n"),
        ("expected a mapping",),
    ),
    BadInput(
        P,
        "params file missing",
        "train_teacher",
        lambda t, r: ["--params", str(t / "absent.yaml")],
        ("absent.yaml", "not found"),
    ),
    BadInput(
        P,
        "misspelt key",
        "train_teacher",
        params_with(setting("prune", "ratoi", 0.5)),
        ("prune.ratoi", "Extra inputs"),
    ),
    BadInput(
        P,
        "value out of range",
        "train_teacher",
        params_with(setting("prune", "ratio", 1.5)),
        ("prune.ratio", "1.5"),
    ),
    BadInput(
        P,
        "wrong type",
        "train_teacher",
        params_with(setting("train_teacher", "epochs", "ten")),
        ("train_teacher.epochs", "ten"),
    ),
    BadInput(
        P,
        "unknown model",
        "train_teacher",
        params_with(setting("train_teacher", "arch", "resnet99")),
        ("unknown model", "resnet20"),
    ),
    BadInput(
        P,
        "unknown criterion",
        "train_teacher",
        params_with(setting("score", "criterion", "entropy")),
        ("unknown criterion", "symdiv"),
    ),
    BadInput(
        P,
        "unknown dataset",
        "prepare",
        params_with(setting("data", "dataset", "mnist")),
        ("unknown dataset", "fashion_mnist"),
    ),
    BadInput(
        P,
        "DCA layer the model lacks, caught before the teacher trains",
        "train_teacher",
        params_with(setting("fit_dca", "layer", "layer9")),
        ("fit_dca.layer", "layer9", "layer1"),
    ),
    BadInput(
        P,
        "per-layer ratios of the wrong length",
        "train_teacher",
        params_with(settings(prune={"budget": "per_layer", "ratios": [0.5] * 4})),
        ("prune.ratios", "4 entries", "9 prunable"),
    ),
    BadInput(
        P,
        "ratios the chosen budget ignores",
        "train_teacher",
        params_with(settings(prune={"ratios": [0.5] * 9})),
        ("prune.ratios", "per_layer only"),
    ),
    BadInput(
        P,
        "per_layer budget without ratios",
        "train_teacher",
        params_with(settings(prune={"budget": "per_layer"})),
        ("per_layer needs prune.ratios",),
    ),
    BadInput(
        P,
        "coarse map of the wrong length",
        "train_teacher",
        params_with(setting("score", "coarse_map", [0, 1] * 4)),
        ("score.coarse_map", "10 classes"),
    ),
    BadInput(
        P,
        "coarse map with the hierarchy off",
        "train_teacher",
        params_with(settings(score={"hierarchy": False, "coarse_map": [0, 1] * 5})),
        ("score.coarse_map", "hierarchy"),
    ),
    BadInput(
        P,
        "T beyond the block count",
        "train_teacher",
        params_with(setting("score", "coarse_blocks", 20)),
        ("score.coarse_blocks", "20", "9"),
    ),
    BadInput(
        P,
        "more coarse groups than classes",
        "train_teacher",
        params_with(setting("score", "n_coarse", 11)),
        ("score.n_coarse", "11", "10 classes"),
    ),
    BadInput(
        P,
        "a device this machine lacks",
        "dump_stats",
        params_with(setting("runtime", "device", "cuda:99")),
        ("runtime.device", "cuda:99"),
    ),
    BadInput(
        P,
        "not a device",
        "train_teacher",
        params_with(setting("runtime", "device", "tpu")),
        ("runtime.device", "tpu"),
    ),
    BadInput(
        P,
        "di without its grid statistics",
        "train_teacher",
        params_with(settings(score={"criterion": "di"}, dump_stats={"grid": None})),
        ("di", "dump_stats.grid"),
    ),
    BadInput(
        P,
        "validation larger than the training set",
        "prepare",
        params_with(setting("data", "val_size", 100000)),
        ("data.val_size", "100000"),
    ),
    # model files
    BadInput(
        F,
        "teacher missing",
        "dump_stats",
        lambda t, r: ["--teacher", str(t / "absent.pt")],
        ("absent.pt", "not found", "train_teacher"),
    ),
    BadInput(
        F,
        "teacher empty",
        "dump_stats",
        bad_file("--teacher", "empty.pt", json_text("")),
        ("empty.pt", "empty file"),
    ),
    BadInput(
        F,
        "teacher truncated",
        "dump_stats",
        bad_file("--teacher", "cut.pt", from_repo("data/teacher/model.pt", half)),
        ("cut.pt", "not a readable teacher model"),
    ),
    BadInput(
        F,
        "teacher of random bytes",
        "dump_stats",
        bad_file("--teacher", "random.pt", from_repo("data/teacher/model.pt", lambda b: RANDOM)),
        ("random.pt", "not a readable teacher model"),
    ),
    BadInput(
        F,
        "teacher of another class count",
        "dump_stats",
        bad_file("--teacher", "k5.pt", model_file("resnet20", 5, 1)),
        ("k5.pt", "num_classes 5", "expected 10"),
    ),
    BadInput(
        F,
        "teacher of another input channel count",
        "dump_stats",
        bad_file("--teacher", "rgb.pt", model_file("resnet20", 10, 3)),
        ("rgb.pt", "in_channels 3"),
    ),
    BadInput(
        F,
        "model record whose widths do not fit its weights",
        "dump_stats",
        bad_file("--teacher", "widths.pt", weights_of_other_widths),
        ("widths.pt", "not a readable teacher model", "size mismatch"),
    ),
    BadInput(
        F,
        "a tensor file that is not a model",
        "dump_stats",
        bad_file("--teacher", "tensor.pt", lambda p, r: torch.save({"weight": torch.zeros(3)}, p)),
        ("tensor.pt", "not a cdc teacher model", "arch"),
    ),
    BadInput(
        F,
        "pruned model of another architecture",
        "fit_dca",
        bad_file("--pruned", "vgg.pt", model_file("vgg_small", 10, 1)),
        ("vgg.pt", "arch 'vgg_small'", "rerun prune"),
    ),
    BadInput(
        F,
        "student of another dataset (export)",
        "export",
        bad_file("--student", "k5.pt", model_file("resnet20", 5, 1)),
        ("k5.pt", "num_classes 5"),
    ),
    BadInput(
        F,
        "resume checkpoint of random bytes",
        "train_teacher",
        None,
        ("last.pt", "not a readable resume checkpoint"),
    ),  # type: ignore[arg-type]
    # tables and JSON
    BadInput(
        F,
        "statistics file of another kind (the scores)",
        "score",
        bad_file("--stats", "scores.parquet", from_repo("data/score/scores.parquet", lambda b: b)),
        ("scores.parquet", "not a table of activation statistics", "pixels_per_image"),
    ),
    BadInput(
        F,
        "statistics file of random bytes",
        "score",
        bad_file("--stats", "random.parquet", json_text("not parquet at all" * 10)),
        ("random.parquet", "not a readable table of activation statistics"),
    ),
    BadInput(
        F,
        "statistics of another model (a layer short)",
        "score",
        bad_file("--stats", "short.parquet", stats_without_last_layer),
        ("short.parquet", "other layers", "rerun dump_stats"),
    ),
    BadInput(
        F,
        "statistics table with no rows",
        "score",
        bad_file(
            "--stats",
            "empty.parquet",
            lambda p, r: pq.write_table(pq.read_table(r / "data/stats/stats.parquet").slice(0, 0), p),
        ),
        ("empty.parquet", "no rows"),
    ),
    BadInput(
        F,
        "scores of another model",
        "prune",
        bad_file("--scores", "other.parquet", scores_renamed),
        ("other.parquet", "another model", "rerun score"),
    ),
    BadInput(
        F,
        "scores file with a column missing",
        "prune",
        bad_file("--scores", "cols.parquet", parquet(pa.table({"layer": ["a"], "score": [1.0]}))),
        ("cols.parquet", "channel"),
    ),
    BadInput(
        F,
        "confusion matrix: malformed JSON",
        "score",
        bad_file("--confusion", "c.json", json_text('{"classes": [1, 2],')),
        ("c.json", "not a readable confusion matrix"),
    ),
    BadInput(
        F,
        "confusion matrix of the wrong shape",
        "score",
        bad_file("--confusion", "c.json", json_text('{"classes": ["a", "b"], "matrix": [[1]]}')),
        ("c.json", "shape"),
    ),
    BadInput(
        F,
        "groups file without its key",
        "fit_dca",
        bad_file("--groups", "g.json", json_text('{"groups": []}')),
        ("g.json", "not a readable coarse groups", "fine_to_coarse"),
    ),
    BadInput(
        F,
        "groups of another class count",
        "fit_dca",
        bad_file("--groups", "g.json", json_text('{"fine_to_coarse": [0, 1, 0]}')),
        ("g.json", "10 classes", "rerun score"),
    ),
    BadInput(
        F,
        "DCA bases of random bytes",
        "distill",
        bad_file("--dca", "d.npz", from_repo("data/dca/dca.npz", lambda b: RANDOM)),
        ("d.npz", "not a readable DCA bases"),
    ),
    BadInput(
        F,
        "DCA bases with keys missing",
        "distill",
        bad_file("--dca", "d.npz", npz(w_teacher=np.zeros((4, 2)))),
        ("d.npz", "w_student", "rerun fit_dca"),
    ),
    # prepared datasets
    BadInput(
        F,
        "prepared folder missing",
        "train_teacher",
        lambda t, r: ["--prepared", str(t / "nowhere")],
        ("nowhere", "not found", "prepare"),
    ),
    BadInput(
        F,
        "prepared folder with a split missing",
        "train_teacher",
        prepared_copy(lambda p: (p / "val.npz").unlink()),
        ("split val missing", "prepare"),
    ),
    BadInput(
        F,
        "prepared metadata malformed",
        "train_teacher",
        prepared_copy(lambda p: (p / "meta.json").write_text("{classes")),
        ("meta.json", "not a readable prepared dataset metadata"),
    ),
    BadInput(
        F,
        "prepared metadata without a key",
        "train_teacher",
        prepared_copy(edit_meta(lambda m: m.pop("std"))),
        ("meta.json", "std"),
    ),
    BadInput(
        F,
        "a dataset of a single class",
        "train_teacher",
        prepared_copy(edit_meta(lambda m: m.update(classes=["only"]))),
        ("a single class",),
    ),
    BadInput(
        F,
        "a class with no training image",
        "train_teacher",
        prepared_copy(relabel("train", lambda y: np.where(y == 3, 4, y))),
        ("train.npz", "no image of class 'Dress'"),
    ),
    BadInput(
        F,
        "labels beyond the class list",
        "train_teacher",
        prepared_copy(relabel("test", lambda y: y + 10)),
        ("test.npz", "labels outside 0..9"),
    ),
    BadInput(
        F,
        "images of another shape than the metadata says",
        "train_teacher",
        prepared_copy(edit_meta(lambda m: m.update(input_shape=[3, 32, 32]))),
        ("images of shape", "[3, 32, 32]"),
    ),
    BadInput(
        F,
        "a split of random bytes",
        "train_teacher",
        prepared_copy(lambda p: (p / "test.npz").write_bytes(RANDOM)),
        ("test.npz", "not a readable prepared split"),
    ),
]


def _corrupt_resume_checkpoint(tmp: Path, repo: Path) -> list[str]:
    (tmp / "ckpt").mkdir()
    (tmp / "ckpt" / "last.pt").write_bytes(RANDOM)
    return ["--checkpoints", str(tmp / "ckpt")]


BAD_INPUTS[
    [c.case for c in BAD_INPUTS].index("resume checkpoint of random bytes")
].make = _corrupt_resume_checkpoint


def run_cli(
    args: list[str], caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> tuple[int, str, str]:
    """`cdc ARGS` in-process: (status, the error line(s) logged, everything printed)."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        status = main(args)
    errors = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    captured = capsys.readouterr()
    tracebacks = any(r.exc_info for r in caplog.records)
    return status, errors, captured.out + captured.err + ("Traceback" if tracebacks else "")


@pytest.mark.parametrize("case", BAD_INPUTS, ids=repr)
def test_a_bad_input_is_one_clear_line_exit_2_and_nothing_written(
    case: BadInput, finished, tmp_path: Path, monkeypatch, caplog, capsys
):
    repo, env = finished
    monkeypatch.chdir(repo)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    monkeypatch.delenv("CDC_PARENT_RUN_ID", raising=False)
    args = case.make(tmp_path, repo)
    watched = outputs_of(case.stage, repo)
    before = state_of(watched)
    status, error, printed = run_cli([case.stage, *args], caplog, capsys)
    changed = [p for p, h in state_of(watched).items() if before.get(p) != h]
    missing = [s for s in case.expect if s not in error]
    one_line = error.count("\n") == 0 and bool(error)
    ok = status == 2 and not missing and one_line and not changed and "Traceback" not in printed
    record(
        case.category,
        f"{case.case} (`cdc {case.stage}`)",
        f"exit {status}: {error}",
        ok,
        len(changed),
        not ok,
    )
    assert status == 2, printed[-2000:]
    assert not missing, f"{missing} not in: {error}"
    assert one_line, error
    assert "Traceback" not in printed
    assert not changed, changed


def test_verbose_shows_the_traceback_of_a_bad_input(finished, tmp_path: Path, monkeypatch, caplog, capsys):
    repo, env = finished
    monkeypatch.chdir(repo)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    (tmp_path / "cut.pt").write_bytes(half((repo / "data/teacher/model.pt").read_bytes()))
    status, error, printed = run_cli(
        ["-v", "dump_stats", "--teacher", str(tmp_path / "cut.pt")], caplog, capsys
    )
    assert status == 2 and "cut.pt" in error and "Traceback" in printed


def test_the_cli_process_prints_one_line_and_no_traceback(finished, tmp_path: Path):
    """The same as a user sees it: the real `cdc` process, its stderr and exit status."""
    repo, env = finished
    (tmp_path / "p.yaml").write_text("seed: 0\nprune: {ratio: 0.5\n")
    proc = subprocess.run(
        ["cdc", "prune", "--params", str(tmp_path / "p.yaml")],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
    )
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    ok = proc.returncode == 2 and len(lines) == 1 and "YAML syntax error" in lines[0]
    record(P, "YAML syntax error, as a process", f"exit {proc.returncode}: {lines}", ok, unclear=not ok)
    assert ok, proc.stdout + proc.stderr


def test_a_bug_inside_a_stage_shows_its_traceback_and_is_not_a_bad_input(finished, tmp_path: Path):
    """Only the project's input errors are the user's one-line exit 2: a KeyError raised by the
    stage's own work (a bug) ends the real `cdc` process with its traceback and exit status 1, and
    the stage's outputs stay as they were."""
    repo, env = finished
    watched = outputs_of("prune", repo)
    before = state_of(watched)
    script = (
        "import sys\n"
        "import components.stages.prune as stage\n"
        "def broken(*args, **kwargs):\n"
        "    raise KeyError('widths')  # a bug, hours into a stage\n"
        "stage.run = broken\n"
        "from tools.cli import main\n"
        "sys.exit(main(['prune']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=repo, env=env, capture_output=True, text=True)
    ok = proc.returncode == 1 and "Traceback" in proc.stderr and "KeyError: 'widths'" in proc.stderr
    ok = ok and state_of(watched) == before
    record(
        "bugs", "a KeyError inside the stage's work (a bug)", f"exit {proc.returncode}, traceback shown", ok
    )
    assert ok, proc.stderr[-2000:]


def test_a_pickle_payload_is_refused_and_never_runs(finished, tmp_path: Path, monkeypatch, caplog, capsys):
    repo, env = finished
    monkeypatch.chdir(repo)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    planted = tmp_path / "planted"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {planted}",))

    torch.save({"arch": "resnet20", "state_dict": Payload()}, tmp_path / "evil.pt")
    before = state_of(outputs_of("dump_stats", repo))
    status, error, _ = run_cli(["dump_stats", "--teacher", str(tmp_path / "evil.pt")], caplog, capsys)
    ok = status == 2 and "pickled Python objects" in error and not planted.exists()
    ok = ok and state_of(outputs_of("dump_stats", repo)) == before
    record(
        "safety",
        "checkpoint carrying a pickle payload that would run a command",
        f"exit {status}: {error}; the command did not run",
        ok,
    )
    assert ok, error


def test_every_torch_load_in_the_code_is_weights_only():
    """An AST scan: no `torch.load` call without `weights_only=True` in the shipped code."""
    offenders = []
    for folder in ("cdc", "components", "pipeline", "tools", "bench"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load":
                    if getattr(node.func.value, "id", None) != "torch":
                        continue
                    kw = {k.arg: k.value for k in node.keywords}
                    if not (
                        isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                    ):
                        offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    record(
        "safety",
        "every torch.load in cdc/, components/, pipeline/, tools/, bench/ is weights_only=True",
        f"offenders: {offenders or 'none'}",
        not offenders,
    )
    assert not offenders


def test_no_credential_reaches_an_output_a_log_or_mlflow(finished, workspace, tmp_path: Path):
    """The shared tiny `cdc repro` ran with sentinel credentials in its environment (conftest): none
    may appear in any file it wrote (outputs, dvc.lock, MLflow store and artifacts) nor in the compiled
    Kubeflow pipeline compiled with them set."""
    ws, env = workspace
    compiled = tmp_path / "pipeline.yaml"
    run_ok(["cdc", "kfp", "compile", "--output", str(compiled)], ws, {**env, **CREDENTIAL_SENTINELS})
    roots = [ws / "data", ws / "metrics", ws / "mlartifacts", ws / "dvc.lock", ws / "mlflow.db", compiled]
    files = [f for r in roots for f in ([r] if r.is_file() else r.rglob("*")) if f.is_file()]
    found = []
    for f in files:
        data = f.read_bytes()
        found += [f"{f.name}: {k}" for k, v in CREDENTIAL_SENTINELS.items() if v.encode() in data]
    record(
        "safety",
        f"credentials in the environment of a pipeline run and a compile ({len(files)} files grepped)",
        f"found: {found or 'none'}",
        not found and len(files) > 20,
    )
    assert len(files) > 20 and not found, found


# --------------------------------------------------------------------------------------------------- kills

SCORES = "data/score/scores.parquet"


@pytest.fixture(scope="module")
def trainer(finished, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    """A folder with the finished run's inputs and params for two-epoch teacher and distill runs, each
    stage's uninterrupted reference run (`ref-train_teacher`, `ref-distill`), and the environment. The
    references and the killed runs are forked from a stage server, as under `cdc repro`
    (`$CDC_STAGE_SERVER` set); the resumed runs start processes of their own, as under `dvc repro`: equal
    weights prove the two ways the same."""
    repo, env = finished
    root = tmp_path_factory.mktemp("kills")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train_teacher"]["epochs"] = params["distill"]["epochs"] = 2
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    inputs = ("data/prepared", "data/teacher/model.pt", "data/prune/model.pt", "data/dca/dca.npz", SCORES)
    inputs += ("data/latency/table.json",)  # what prune reads besides (a stub under the tiny params)
    for rel in inputs:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(repo / rel, root / rel)
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    with stage_server.running(env) as served:
        for stage in ("train_teacher", "distill"):
            run_ok(stage_command(stage, f"ref-{stage}"), root, served)
        yield root, served


def stage_command(stage: str, out: str) -> list[str]:
    inputs = {
        "train_teacher": [],
        "distill": ["--pruned", "data/prune/model.pt", "--dca", "data/dca/dca.npz"],
    }
    outs = ["--model", f"{out}/model.pt", "--history", f"{out}/h.csv", "--metrics", f"{out}/m.json"]
    return [
        "cdc",
        stage,
        "--prepared",
        "data/prepared",
        *inputs[stage],
        *outs,
        "--checkpoints",
        f"{out}/ckpt",
    ]


# (stage, fault point, exit status, whether a checkpoint exists to resume from, what). Both stages run the
# one epoch loop (components/epochs.py): a case is here once unless the stage's own state changes what
# it proves (distill's student basis and loss sums across a checkpoint, mid-epoch and at an epoch's end)
KILLS = [
    (
        "train_teacher",
        "train_teacher.step:3",
        -signal.SIGKILL,
        False,
        "SIGKILL mid-epoch 1 (reruns from scratch)",
    ),
    ("train_teacher", "train_teacher.step:13", -signal.SIGKILL, True, "SIGKILL mid-epoch 2"),
    ("train_teacher", "train_teacher.step:11:TERM", 143, True, "SIGTERM mid-epoch 2 (preemption)"),
    ("distill", "distill.epoch:1", -signal.SIGKILL, True, "SIGKILL right after the epoch-1 checkpoint"),
    ("distill", "distill.step:13:TERM", 143, True, "SIGTERM mid-epoch 2 (preemption)"),
]


@pytest.mark.parametrize(
    ("stage", "point", "status", "resumes", "what"), KILLS, ids=[f"{k[0]}-{k[1]}" for k in KILLS]
)
def test_a_killed_training_stage_leaves_no_output_and_resumes_to_the_same_weights(
    trainer, stage: str, point: str, status: int, resumes: bool, what: str
):
    root, served = trainer
    env = {k: v for k, v in served.items() if k != stage_server.SERVER_ENV}
    out = f"cut-{point.replace(':', '-')}"
    killed = subprocess.run(
        stage_command(stage, out),
        cwd=root,
        env={**served, "CDC_FAILPOINT": point},
        capture_output=True,
        text=True,
    )
    declared = [root / out / name for name in ("model.pt", "h.csv", "m.json")]
    left = [str(p) for p in declared if p.exists()] + [p.name for p in (root / out).glob(".*")]
    checkpointed = (root / out / "ckpt" / "last.pt").exists()
    resumed = subprocess.run(stage_command(stage, out), cwd=root, env=env, capture_output=True, text=True)
    ref = torch.load(root / f"ref-{stage}" / "model.pt", weights_only=True)["state_dict"]
    same = resumed.returncode == 0 and all(
        torch.equal(v, torch.load(root / out / "model.pt", weights_only=True)["state_dict"][k])
        for k, v in ref.items()
    )
    same_history = (
        same and (root / out / "h.csv").read_text() == (root / f"ref-{stage}" / "h.csv").read_text()
    )
    ok = killed.returncode == status and not left and checkpointed == resumes and same and same_history
    ok = ok and ("resumed from" in resumed.stderr) == resumes
    record(
        "kill",
        f"`cdc {stage}` forked from a stage server (as under `cdc repro`): {what} (`{point}`); resumed in a "
        "process of its own",
        f"exit {killed.returncode}; declared outputs left: {len(left)}; checkpoint kept: {checkpointed}; "
        f"resumed run exit {resumed.returncode}, weights {'bitwise equal' if same else 'DIFFERENT'} to an "
        f"uninterrupted run, history {'equal' if same_history else 'DIFFERENT'}",
        ok,
        lost=len(left),
    )
    assert killed.returncode == status, killed.stderr[-2000:]
    assert not left, left
    assert checkpointed == resumes
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert ("resumed from" in resumed.stderr) == resumes
    assert same and same_history
    if status == 143:
        assert "a checkpoint was saved: rerun to resume" in killed.stderr


def test_sigkill_from_outside_leaves_the_previous_outputs_intact(finished, tmp_path: Path):
    """A real asynchronous kill: `cdc dump_stats` over the finished run's outputs, SIGKILLed while it
    works; its declared outputs are still the previous run's, byte for byte. A staging leftover (hidden,
    never a declared output) may remain; the rerun clears it and writes the same bytes again."""
    repo, env = finished
    ws = tmp_path / "ws"
    for rel in ("data/prepared", "data/teacher/model.pt", "data/stats", "params.yaml"):
        (ws / rel).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (repo / rel).is_dir() else shutil.copy)(repo / rel, ws / rel)
    watched = outputs_of("dump_stats", ws)
    before = {p: md5(p) for p in watched}
    proc = subprocess.Popen(
        ["cdc", "dump_stats"], cwd=ws, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    for line in proc.stderr:  # the stage is at work once it says which device it runs on
        if "running on" in line:
            break
    time.sleep(0.5)
    proc.kill()
    proc.wait()
    changed = [str(p) for p in watched if md5(p) != before[p]]
    leftovers = [p.name for p in (ws / "data/stats").glob(".*")]
    rerun = subprocess.run(["cdc", "dump_stats"], cwd=ws, env=env, capture_output=True, text=True)
    cleared = rerun.returncode == 0 and not list((ws / "data/stats").glob(".*"))
    same = all(md5(p) == before[p] for p in watched)
    # the tracking worker outlives the stage process: it ends the killed stage's run as KILLED
    runs = stage_runs(env, "dump_stats")
    recorded = [r.info.status for r in runs[:2]] == ["FINISHED", "KILLED"]
    ok = proc.returncode == -signal.SIGKILL and not changed and cleared and same and recorded
    record(
        "kill",
        "`cdc dump_stats` SIGKILLed from outside while at work",
        f"exit {proc.returncode}; declared outputs changed: {len(changed)}; staging leftovers "
        f"{leftovers or 'none'} cleared by the rerun: {cleared}; rerun wrote the same bytes: {same}; "
        f"MLflow run of the killed stage ended KILLED: {recorded}",
        ok,
        lost=len(changed),
    )
    assert proc.returncode == -signal.SIGKILL and not changed, changed
    assert cleared and same, rerun.stderr[-2000:]
    assert recorded, [(r.info.run_id, r.info.status) for r in runs]


def stage_runs(env: dict[str, str], stage: str) -> list:
    """The MLflow runs of `stage` in the store of `env`, newest first."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("cdc")
    return client.search_runs(
        [experiment.experiment_id], f"tags.`cdc.stage` = '{stage}'", order_by=["attributes.start_time DESC"]
    )


# ----------------------------------------------------------------------------------------------- numerics


def test_a_diverging_loss_stops_with_the_epoch_and_step_and_writes_nothing(trainer):
    root, env = trainer
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train_teacher"].update(lr=1e8, warmup_epochs=0)
    (root / "diverge.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run(
        [*stage_command("train_teacher", "nan"), "--params", "diverge.yaml"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    left = [p.name for p in (root / "nan").glob("*") if p.name != "ckpt"]
    message = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    ok = (
        proc.returncode == 2
        and "epoch 1" in message
        and "non-finite training loss" in message
        and "at step" in message
    )
    ok = ok and "lower train_teacher.lr" in message and not left and "Traceback" not in proc.stderr
    record(
        "numerical",
        "teacher learning rate 1e8: the loss overflows",
        f"exit {proc.returncode}: {message}",
        ok,
        lost=len(left),
    )
    assert ok, proc.stderr[-2000:]


def test_a_non_finite_loss_is_caught_before_its_update():
    """The step whose loss is NaN does not touch the weights: the last checkpoint stays good."""
    from cdc.train import TrainingDiverged, sgd, train_one_epoch, warmup_cosine

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(5)]
    optimizer = sgd(model, 0.1, 0.9, 0.0)
    snapshots = []

    def step_loss(x, y):
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return (loss * float("nan") if len(snapshots) == 3 else loss), logits

    with pytest.raises(TrainingDiverged, match="at step 3"):
        train_one_epoch(model, batches, optimizer, warmup_cosine(optimizer, 5, 0), step_loss)
    after = model.state_dict()
    unchanged = all(torch.equal(after[k], snapshots[2][k]) for k in after)
    record(
        "numerical",
        "a NaN loss at step 3 of an epoch",
        f"TrainingDiverged 'at step 3'; weights as before the step: {unchanged}",
        unchanged,
    )
    assert unchanged


def test_dead_channels_and_absent_classes_score_finite_with_every_criterion():
    from cdc.discriminants import DISCRIMINANTS
    from cdc.scoring import score_layers
    from cdc.stats import GridStats, LayerStats

    rng = np.random.default_rng(0)
    k, c, d = 5, 6, 16
    n = np.array([40, 0, 30, 25, 50])  # class 1 absent
    s1 = rng.random((k, c)) * n[:, None] * d
    s2 = s1**2 / (n[:, None] * d).clip(1) + rng.random((k, c)) * n[:, None] * d
    s1[:, 2] = s2[:, 2] = 0.0  # channel 2 dead: always zero
    s1[1] = s2[1] = 0.0
    stats = {"layer": LayerStats(n, d, s1, s2)}
    g = 4
    grid_s1 = rng.random((k, c, g)) * n[:, None, None]
    grid_s1[:, 2] = 0.0
    grid_s1[1] = 0.0
    outer = np.stack([np.eye(g) * 50 + 1 for _ in range(c)])
    outer[2] = 0.0
    grid = {"layer": GridStats(n, grid_s1, outer)}
    results = {}
    for name in sorted(DISCRIMINANTS) + ["di"]:
        scored = score_layers(grid if name == "di" else stats, name, np.arange(k), 0, seed=0)
        results[name] = bool(np.isfinite(scored[0].scores).all())
    ok = all(results.values())
    record(
        "numerical",
        "a dead channel (zero variance) and an absent class, every class discriminant",
        f"finite scores: {results}",
        ok,
    )
    assert ok, results
    with pytest.raises(ValueError, match="fewer than two classes"):
        score_layers({"layer": LayerStats(np.array([5, 0]), d, s1[:2], s2[:2])}, "symdiv", np.arange(2), 0, 0)


def test_ill_conditioned_dca_gives_a_finite_basis_or_a_clear_error():
    from cdc.dca import solve_dca

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6))
    x = np.hstack([x, x[:, :3], np.zeros((200, 3))])  # duplicated and constant features: S_W singular
    labels = rng.integers(0, 3, 200)
    mu = x.mean(0)
    s_w = sum(
        (x[labels == j] - x[labels == j].mean(0)).T @ (x[labels == j] - x[labels == j].mean(0))
        for j in range(3)
    )
    s_b = sum(
        (labels == j).sum() * np.outer(x[labels == j].mean(0) - mu, x[labels == j].mean(0) - mu)
        for j in range(3)
    )
    w, values = solve_dca(s_b / 200, s_w / 200, 3)
    finite = bool(np.isfinite(w).all() and np.isfinite(values).all())
    with pytest.raises(ValueError, match="within-class scatter is zero"):
        solve_dca(np.zeros((4, 4)), np.zeros((4, 4)), 2)
    record(
        "numerical",
        "DCA on singular scatter (duplicated and constant features); on all-constant features",
        f"finite basis: {finite}; all-constant: clear error naming fit_dca.layer",
        finite,
    )
    assert finite


# ----------------------------------------------------------------------------------------------- services


def test_an_unreachable_tracking_server_fails_fast_before_training(trainer):
    root, env = trainer
    start = time.perf_counter()
    proc = subprocess.run(
        stage_command("train_teacher", "offline"),
        cwd=root,
        env={**env, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"},
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    message = proc.stderr.strip().splitlines()[-1]
    ok = (
        proc.returncode == 2
        and "http://127.0.0.1:9 unreachable" in message
        and not (root / "offline").exists()
    )
    record(
        "service",
        "MLflow tracking server unreachable",
        f"exit {proc.returncode} after {seconds:.0f} s, nothing written: {message}",
        ok,
    )
    assert ok, proc.stderr[-2000:]
    assert seconds < 60


def test_opting_in_logs_locally_when_the_server_is_unreachable(trainer):
    root, env = trainer
    inputs = ["--prepared", "data/prepared", "--teacher", "data/teacher/model.pt", "--scores", SCORES]
    proc = subprocess.run(
        ["cdc", "prune", *inputs, "--model", "fallback/model.pt", "--report", "fallback/report.json"],
        cwd=root,
        env={**env, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9", "CDC_TRACKING_FALLBACK": "local"},
        capture_output=True,
        text=True,
    )
    ok = (
        proc.returncode == 0
        and "logging into sqlite:///" in proc.stderr
        and (root / "fallback/model.pt").exists()
    )
    record(
        "service",
        "MLflow server unreachable, CDC_TRACKING_FALLBACK=local",
        f"exit {proc.returncode}; logged into the local ./mlflow.db and said so",
        ok,
    )
    assert ok, proc.stderr[-2000:]


def test_a_server_lost_midway_lets_the_stage_finish_and_reports_it(trainer, tmp_path: Path):
    root, env = trainer
    port = 5000 + os.getpid() % 1000
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--default-artifact-root",
            str(tmp_path / "art"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        from components.tracking import server_problem

        uri = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while server_problem(uri) and time.time() < deadline:
            time.sleep(1)
        assert not server_problem(uri), "mlflow server did not start"
        proc = subprocess.Popen(
            stage_command("train_teacher", "lost"),
            cwd=root,
            env={**env, "MLFLOW_TRACKING_URI": uri},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stderr is not None
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "running on" in line:  # the run is open, training starts: the server goes away
                os.killpg(server.pid, signal.SIGKILL)
                break
        lines += proc.stderr.readlines()
        proc.wait()
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    text = "".join(lines)
    outputs = all((root / "lost" / n).exists() for n in ("model.pt", "h.csv", "m.json"))
    ok = proc.returncode == 0 and outputs and "MLflow lost" in text
    record(
        "service",
        "MLflow server killed while the teacher trains",
        f"exit {proc.returncode}; outputs complete: {outputs}; reported at the end: {'MLflow lost' in text}",
        ok,
    )
    assert ok, text[-3000:]


def test_a_second_repro_in_the_same_workspace_is_refused(finished, tmp_path: Path):
    repo, env = finished
    ws = tmp_path / "ws"
    shutil.copytree(repo, ws, symlinks=True)
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{ws / 'mlflow.db'}"}
    first = subprocess.Popen(
        ["dvc", "repro", "--force", "-s", "dump_stats"],
        cwd=ws,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    assert first.stdout is not None
    for line in first.stdout:
        if "Running stage" in line:
            break
    # frozen mid-run (holding DVC's lock) while the second starts: however fast the stage is
    os.killpg(first.pid, signal.SIGSTOP)
    try:
        second = subprocess.run(["cdc", "repro"], cwd=ws, env=env, capture_output=True, text=True)
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    first.stdout.read()
    first.wait()
    status = subprocess.run(["dvc", "status"], cwd=ws, env=env, capture_output=True, text=True)
    said = second.stdout + second.stderr
    refused = second.returncode != 0 and ("Unable to acquire lock" in said or "is being blocked by" in said)
    intact = first.returncode == 0 and "up to date" in status.stdout
    record(
        "service",
        "`cdc repro` while another `dvc repro` runs in the workspace",
        f"second refused by DVC's lock (exit {second.returncode}); first finished (exit "
        f"{first.returncode}); `dvc status` up to date: {intact}",
        refused and intact,
    )
    assert refused, second.stdout[-2000:] + second.stderr[-2000:]
    assert intact, status.stdout
