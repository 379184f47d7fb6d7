"""The DVC experiment loop a user runs daily: commit a baseline, `dvc exp run -S ...`, then compare
with `dvc exp show` and `dvc metrics diff`, in a copy of the tiny `dvc repro` workspace."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from components import stage_server
from tests.conftest import copy_workspace, run_ok

pytestmark = pytest.mark.e2e


def _json(args: list[str], repo: Path, env: dict) -> object:
    proc = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def _numbers(entry: dict) -> dict:
    """The metrics of one `dvc exp show --json` entry, by file then key."""
    data = entry.get("data") or {}
    return {path: m.get("data", {}) for path, m in (data.get("metrics") or {}).items()}


@pytest.fixture(scope="module")
def experiment(workspace, first_repro, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    repo, env = copy_workspace(workspace, tmp_path_factory.mktemp("exp") / "repo")
    run_ok(["git", "add", "-A"], repo, env)
    run_ok(["git", "commit", "-qm", "baseline", "--allow-empty"], repo, env)
    # up to evaluate, whose metrics the tests read (export would add its 15 s and nothing they check); the
    # stages forked from a stage server, as `cdc repro` runs them (what is tested here is DVC's loop)
    with stage_server.running(env) as served:
        run_ok(["dvc", "exp", "run", "-n", "ratio-0.3", "-S", "prune.ratio=0.3", "evaluate"], repo, served)
    return repo, env


def test_exp_show_has_the_metrics_of_the_baseline_and_the_experiment(experiment):
    repo, env = experiment
    rows = _json(["dvc", "exp", "show", "--json"], repo, env)
    baseline = next(r for r in rows if r.get("rev") != "workspace")
    (exp,) = [e for e in baseline.get("experiments") or [] if e.get("name") == "ratio-0.3"]
    base_metrics = _numbers(baseline)
    exp_metrics = _numbers(exp["revs"][0])
    for metrics in (base_metrics, exp_metrics):
        assert {"metrics/teacher.json", "metrics/student.json", "metrics/evaluate.json"} <= set(metrics)
    base_flops = base_metrics["metrics/evaluate.json"]["student"]["flops"]
    exp_flops = exp_metrics["metrics/evaluate.json"]["student"]["flops"]
    assert exp_flops > base_flops  # 30% of channels removed instead of 53%
    assert exp_metrics["metrics/teacher.json"] == base_metrics["metrics/teacher.json"]  # not rerun


def test_metrics_diff_reports_the_students_flops_change(experiment):
    repo, env = experiment
    diff = _json(["dvc", "metrics", "diff", "--json"], repo, env)
    change = diff["metrics/evaluate.json"]["student.flops"]
    assert isinstance(change["old"], int | float) and isinstance(change["new"], int | float)
    assert change["diff"] == change["new"] - change["old"] > 0
