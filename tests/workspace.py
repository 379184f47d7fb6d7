"""A throw-away git + DVC copy of the repository with the tiny params profile: what the end-to-end
tests run `cdc repro` in, and bench/pipeline_overhead.py too (no pytest here)."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from cdc.params import Params
from tools.compare import copy_repository

REPO = Path(__file__).resolve().parents[1]


# The tiny profile of the end-to-end runs: seconds per stage on a 2-core CPU.
TINY = {
    "seed": 0,
    "data": {"train_limit": 600, "test_limit": 200, "val_size": 100},
    "train_teacher": {"epochs": 1, "batch_size": 64},
    "score": {"n_coarse": 3},
    "fit_dca": {"max_images": 200},
    "distill": {"epochs": 1, "batch_size": 64, "refit_every": 1},
    "evaluate": {"bn_recalibration_batches": 3, "latency_rounds": 3},
}


def run_ok(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    """Run a command; raise AssertionError with its output tail unless it exits 0."""
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def run_here(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`cdc <args>` run in this process with `cwd` and `env` (restored after): what a process would
    return, for the tests that are about a command's output and exit status, not its process (2-3 s of
    imports each; tests/test_reliability.py and tests/test_stage_server.py keep the real boundary)."""
    from tools.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd = dict(os.environ), Path.cwd()
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(args)
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess(["cdc", *args], code, out.getvalue(), err.getvalue())


def clean_env(tracking_db: Path) -> dict[str, str]:
    """This environment without MLflow/CDC settings, tracking into `tracking_db`, this venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "CDC_", "KFP_"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        MLFLOW_TRACKING_URI=f"sqlite:///{tracking_db}",
        DVC_NO_ANALYTICS="1",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@t",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@t",
    )
    return env


def make_workspace(ws: Path, raw: Path) -> dict[str, str]:
    """Copy the repository's files (tracked and untracked, not ignored) and the raw Fashion-MNIST under
    `raw` into `ws`, write the tiny params, commit it all; returns the environment to run commands in."""
    copy_repository(ws)
    shutil.copytree(raw / "FashionMNIST", ws / "data" / "raw" / "FashionMNIST")
    # DVC needs every section a stage names: the tiny profile over the schema defaults
    (ws / "params.yaml").write_text(yaml.safe_dump(Params.model_validate(TINY).model_dump()))
    env = clean_env(ws / "mlflow.db")
    run_ok(["git", "init", "-q"], ws, env)
    if not (ws / ".dvc").exists():
        run_ok(["dvc", "init", "-q"], ws, env)
    run_ok(["git", "add", "-A"], ws, env)
    run_ok(["git", "commit", "-qm", "tiny"], ws, env)
    return env
