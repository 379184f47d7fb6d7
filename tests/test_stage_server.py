"""The stage server (components/stage_server.py), which `cdc repro` and `cdc compare` fork their stages from:
a forked stage writes the same bytes, exits with the same status, dies of the same signals and leaves the
same MLflow run as a stage in its own process."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from components import stage_server
from components.stages import STAGE_BY_NAME
from components.tracking import md5
from tests.conftest import copy_workspace
from tests.workspace import run_ok

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def finished(workspace, first_repro, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    return copy_workspace(workspace, tmp_path_factory.mktemp("served") / "repo")


@pytest.fixture(scope="module")
def served(finished) -> tuple[Path, dict[str, str]]:
    """The finished workspace and an environment whose `cdc` stage commands are forked from a server."""
    ws, env = finished
    with stage_server.running(env) as served_env:
        assert stage_server.SERVER_ENV in served_env
        yield ws, served_env


def outputs(stage: str, ws: Path) -> dict[str, str]:
    return {name: md5(ws / path) for name, path in STAGE_BY_NAME[stage].outputs.items()}


def test_a_forked_stage_writes_the_bytes_its_own_process_writes(finished, served):
    ws, env = finished
    run_ok(["cdc", "score"], ws, env)  # no server in this environment: a process of its own
    own = outputs("score", ws)
    said = run_ok(["cdc", "-v", "score"], ws, served[1])
    assert "forked from the stage server" in said
    assert outputs("score", ws) == own


def test_exit_status_help_and_bad_input_come_back_as_from_a_process(served):
    ws, env = served
    bad = subprocess.run(
        ["cdc", "score", "--params", "nope.yaml"], cwd=ws, env=env, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "nope.yaml" in bad.stderr and "Traceback" not in bad.stderr
    helped = subprocess.run(["cdc", "prune", "--help"], cwd=ws, env=env, capture_output=True, text=True)
    assert helped.returncode == 0 and "--scores" in helped.stdout
    usage = subprocess.run(["cdc", "prune", "--bogus"], cwd=ws, env=env, capture_output=True, text=True)
    assert usage.returncode == 2 and "unrecognized arguments: --bogus" in usage.stderr
    # not a stage: the command runs in its own process, as it would without a server
    shown = subprocess.run(["cdc", "summary"], cwd=ws, env=env, capture_output=True, text=True)
    assert shown.returncode == 0 and "student" in shown.stdout


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_signalled_command_takes_its_forked_stage_with_it(served, signum: int):
    """SIGTERM is passed on to the stage; on SIGKILL (which the command cannot pass on) the server kills
    the stage. Either way the command dies of the signal, the declared outputs stay the previous run's and
    the stage's MLflow run ends KILLED (its tracking worker, forked too, outlives it)."""
    ws, env = served
    before = outputs("dump_stats", ws)
    proc = subprocess.Popen(
        ["cdc", "dump_stats"], cwd=ws, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    for line in proc.stderr:  # at work once it says which device it runs on
        if "running on" in line:
            break
    proc.send_signal(signum)
    proc.wait()
    assert proc.returncode == -signum
    status, deadline = None, time.monotonic() + 30
    while status != "KILLED" and time.monotonic() < deadline:
        time.sleep(0.2)
        status = last_run_status(env, "dump_stats")
    assert status == "KILLED"
    assert outputs("dump_stats", ws) == before


def last_run_status(env: dict[str, str], stage: str) -> str:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("cdc")
    runs = client.search_runs(
        [experiment.experiment_id], f"tags.`cdc.stage` = '{stage}'", order_by=["attributes.start_time DESC"]
    )
    return runs[0].info.status


def test_a_command_from_another_environment_or_not_a_stage_is_refused():
    ours = stage_server.import_time_env({"OMP_NUM_THREADS": "1", "PYTHONPATH": "/code", "HOME": "/root"})
    assert ours == {"OMP_NUM_THREADS": "1", "PYTHONPATH": "/code"}  # what is read when torch loads
    request = {"argv": ["cdc", "score"], "env": {"OMP_NUM_THREADS": "2", "PYTHONPATH": "/code"}}
    request["python"] = stage_server._python()
    assert "OMP_NUM_THREADS" in str(stage_server._refusal(request, ours))
    assert stage_server._refusal(request | {"env": {**ours, "CDC_FAILPOINT": "x"}}, ours) is None
    assert "another Python" in str(
        stage_server._refusal(request | {"env": ours, "python": "/usr/bin/python3 /usr"}, ours)
    )
    assert "not a stage" in str(
        stage_server._refusal(request | {"argv": ["cdc", "repro"], "env": ours}, ours)
    )


def test_without_a_server_or_with_it_turned_off_the_command_runs_itself(monkeypatch, tmp_path: Path):
    monkeypatch.delenv(stage_server.SERVER_ENV, raising=False)
    assert stage_server.forward(["cdc", "score"]) is None
    monkeypatch.setenv(stage_server.SERVER_ENV, str(tmp_path / "gone.socket"))  # nothing listens there
    assert stage_server.forward(["cdc", "score"]) is None
    with stage_server.running({"PATH": "/bin", stage_server.SERVER_ENV: "off"}) as env:
        assert stage_server.SERVER_ENV not in env
