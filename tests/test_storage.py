"""S3 storage against a real S3 server on 127.0.0.1 (moto's server): the DVC remote round trip, MLflow
artifacts on S3, errors that name the endpoint and bucket, and no credentials written anywhere."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import mlflow
import pytest
import yaml

from components.tracking import md5
from tests.conftest import RAW, TINY, clean_env, run_ok
from tools import lineage

pytestmark = pytest.mark.e2e
SECRET = "s3cr3t-never-written-anywhere"
BUCKET = "cdc-artifacts"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**clean_env(Path("/nonexistent")), **(extra_env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """An S3 server on loopback with one bucket; yields its endpoint."""
    proc, endpoint = _start_server()
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="k",
        aws_secret_access_key=SECRET,
        region_name="us-east-1",
    ).create_bucket(Bucket=BUCKET)
    yield endpoint
    proc.kill()


def s3_env(base: dict[str, str], endpoint: str, bucket: str = BUCKET) -> dict[str, str]:
    return {
        **base,
        "CDC_S3_BUCKET": bucket,
        "CDC_S3_PREFIX": "team/cdc",
        "CDC_S3_ENDPOINT": endpoint,
        "AWS_ACCESS_KEY_ID": "cdc-test-key",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def keys(endpoint: str, prefix: str) -> list[str]:
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="k",
        aws_secret_access_key=SECRET,
        region_name="us-east-1",
    )
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_dvc_push_then_pull_into_an_emptied_workspace_gives_the_same_bytes(s3, repro_copy):
    repo, env = repro_copy
    env = s3_env(env, s3)
    stages = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    outs_in_cache = [
        p for name, entry in stages.items() for p in lineage.outs(entry) if not _uncached(repo, name, p)
    ]
    before = {p: md5(repo / p) for p in outs_in_cache}
    assert len(before) >= 12
    out = run_ok(["cdc", "storage", "push"], repo, env)
    assert "team/cdc/dvc" in out
    assert len(keys(s3, "team/cdc/dvc/")) >= len(before)
    shutil.rmtree(repo / ".dvc" / "cache")
    for p in before:
        target = repo / p
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    run_ok(["cdc", "storage", "pull"], repo, env)
    assert {p: md5(repo / p) for p in before} == before
    # the remote lives in the git-ignored local config, without credentials
    assert "cdc-s3" not in (repo / ".dvc" / "config").read_text()
    local = (repo / ".dvc" / "config.local").read_text()
    assert "s3://cdc-artifacts/team/cdc/dvc" in local and s3 in local and SECRET not in local
    assert (
        ".dvc/config.local"
        not in subprocess.run(
            ["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True
        ).stdout
    )


def _uncached(repo: Path, stage: str, path: str) -> bool:
    """Outputs DVC keeps out of its cache (git-kept metrics and plots, persistent checkpoints)."""
    entry = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"][stage]
    for out in entry.get("outs", []) + entry.get("metrics", []):
        if isinstance(out, dict) and path in out and out[path].get("cache") is False:
            return True
    return False


def test_mlflow_artifacts_go_to_s3_and_read_back(s3, tmp_path: Path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "params.yaml").write_text(yaml.safe_dump(TINY))
    env = s3_env(clean_env(work / "mlflow.db"), s3)
    env["CDC_EXPERIMENT"] = "cdc-s3"
    run_ok(["cdc", "prepare", "--raw", str(RAW), "--prepared", "prepared"], work, env)
    stored = keys(s3, "team/cdc/mlflow/")
    assert any(k.endswith("prepared/meta.json") for k in stored), stored
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("cdc-s3")
    assert experiment.artifact_location == "s3://cdc-artifacts/team/cdc/mlflow"
    (run,) = client.search_runs([experiment.experiment_id])
    saved = {
        k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL")
    }
    os.environ.update(
        AWS_ACCESS_KEY_ID="cdc-test-key", AWS_SECRET_ACCESS_KEY=SECRET, MLFLOW_S3_ENDPOINT_URL=s3
    )
    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id,
            artifact_path="prepared/meta.json",
            dst_path=str(tmp_path / "back"),
            tracking_uri=env["MLFLOW_TRACKING_URI"],
        )
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert Path(local).read_bytes() == (work / "prepared" / "meta.json").read_bytes()
    # nothing the run recorded holds the secret
    assert SECRET not in str(run.data.tags) + str(run.data.params)
    assert SECRET.encode() not in (work / "mlflow.db").read_bytes()


def test_s3_errors_name_the_endpoint_and_bucket(s3, tmp_path: Path):
    base = clean_env(tmp_path / "mlflow.db")
    dead = f"http://127.0.0.1:{_free_port()}"
    cases = {
        "wrong endpoint": (s3_env(base, dead), ["cannot reach", dead, "after 2 attempts"]),
        "missing bucket": (s3_env(base, s3, bucket="no-such-bucket"), ["'no-such-bucket'", "does not exist"]),
    }
    denied_server, denied_endpoint = _start_server({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        cases["denied"] = (s3_env(base, denied_endpoint), ["denied", denied_endpoint, BUCKET])
        for name, (env, expected) in cases.items():
            env = {**env, "AWS_MAX_ATTEMPTS": "2"}
            proc = subprocess.run(
                ["cdc", "storage", "check"], cwd=tmp_path, env=env, capture_output=True, text=True
            )
            assert proc.returncode == 2, name
            for text in expected:
                assert text in proc.stderr, (name, proc.stderr[-1000:])
            assert SECRET not in proc.stdout + proc.stderr
    finally:
        denied_server.kill()
    unset = subprocess.run(["cdc", "storage", "push"], cwd=tmp_path, env=base, capture_output=True, text=True)
    assert unset.returncode == 2 and "CDC_S3_BUCKET is not set" in unset.stderr


@pytest.mark.parametrize("where", ["s3", "mounted path"])
def test_training_checkpoints_mirrored_to_durable_storage_come_back_in_a_fresh_folder(
    s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
):
    """What a retried Kubeflow task sees: its checkpoints folder is new and empty, the mirror (on the S3
    server here, or a PVC-like path) gives back the last state; a finished run clears the mirror;
    another fingerprint (params or inputs) finds nothing there."""
    import torch

    from components.checkpoint import Checkpoints, Mirror

    for key, value in s3_env({}, s3).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3)
    root = f"s3://{BUCKET}/runs/checkpoints" if where == "s3" else str(tmp_path / "pvc")
    state = {"model": {"w": torch.arange(4.0)}, "epoch": 1}
    mirror = Mirror(f"{root}/train_teacher/fp-1")
    first = Checkpoints(tmp_path / "pod-1", "fp-1", mirror=mirror)
    assert first.resume() is None
    first.save(state, epoch=1)
    assert sorted(p.rsplit("/", 1)[1] for p in mirror.fs.ls(mirror.root)) == ["epoch_001.pt", "last.pt"]
    other = Checkpoints(tmp_path / "pod-2", "fp-2", mirror=Mirror(f"{root}/train_teacher/fp-2"))
    assert other.resume() is None
    retried = Checkpoints(tmp_path / "pod-3", "fp-1", mirror=Mirror(f"{root}/train_teacher/fp-1"))
    resumed = retried.resume()
    assert resumed is not None and torch.equal(resumed["model"]["w"], state["model"]["w"])
    assert (tmp_path / "pod-3" / "epoch_001.pt").exists()
    retried.finish()
    assert not mirror.fs.exists(mirror.root)
    assert (
        Checkpoints(tmp_path / "pod-4", "fp-1", mirror=Mirror(f"{root}/train_teacher/fp-1")).resume() is None
    )
