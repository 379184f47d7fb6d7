"""Shared fixtures: a few hundred real Fashion-MNIST images and small models, all on CPU; one tiny
`cdc repro` (real DVC + MLflow) per session, shared by the tests that only read it."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cdc.data import Batches, Split, channel_mean_std, stratified_subset
from cdc.sources import load_raw
from tests.workspace import REPO, TINY, clean_env, make_workspace, run_ok  # noqa: F401 (re-exported)

RAW = Path(os.environ.get("CDC_RAW_ROOT", REPO / "data" / "raw"))

CREDENTIAL_SENTINELS = {
    "AWS_ACCESS_KEY_ID": "AKIACDCSENTINEL0KEY1",
    "AWS_SECRET_ACCESS_KEY": "cdc-sentinel-secret-7f3a9b",
    "MLFLOW_TRACKING_PASSWORD": "cdc-sentinel-password-51c2",
    "MLFLOW_TRACKING_TOKEN": "cdc-sentinel-token-e8d4",
}

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on two cores: one thread each, here and in every process started
    os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", max(1, min(2, os.cpu_count() or 1)))))


@pytest.fixture(scope="session")
def fmnist() -> tuple[Split, Split]:
    """(train, test) of the real Fashion-MNIST; `make data` puts it under data/raw."""
    raw = load_raw("fashion_mnist", RAW)
    return raw.train, raw.test


@pytest.fixture(scope="session")
def small_split(fmnist: tuple[Split, Split]) -> Split:
    """300 class-balanced training images."""
    train, _ = fmnist
    idx = stratified_subset(train.labels, 300, seed=0)
    return Split(train.images[idx], train.labels[idx])


def batches(split: Split, batch_size: int = 64, **kwargs: object) -> Batches:
    mean, std = channel_mean_std(split.images)
    return Batches(split, mean, std, batch_size, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def _shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This session's temporary folder, or under pytest-xdist the one its workers share."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


@contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    """One process at a time (the xdist workers build the shared workspace once)."""
    with lock.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A temporary git + DVC copy of the repository with the tiny params profile, made once for the
    whole run (every xdist worker gets the same one)."""
    root = _shared_root(tmp_path_factory)
    ws = root / "repo"
    with _exclusive(root / "repo.lock"):
        if not ws.exists():
            building = root / "repo.partial"
            shutil.rmtree(building, ignore_errors=True)
            make_workspace(building, RAW)
            building.rename(ws)
    return ws, clean_env(ws / "mlflow.db")


@pytest.fixture(scope="session")
def first_repro(workspace: tuple[Path, dict[str, str]]) -> str:
    """The output of the one `cdc repro` of the tiny profile (every stage runs), run once for the whole
    run. The workspace stays as that run left it: a test that changes anything there works in a copy
    (`repro_copy`)."""
    ws, env = workspace
    output = ws.parent / "repo.repro.txt"
    with _exclusive(ws.parent / "repo.lock"):
        if not output.exists():
            # credentials in the environment must not end up in any output (tests/test_reliability.py greps)
            output.write_text(run_ok(["cdc", "repro"], ws, {**env, **CREDENTIAL_SENTINELS}))
    return output.read_text()


@pytest.fixture(scope="session")
def first_records(workspace: tuple[Path, dict[str, str]], first_repro: str) -> tuple[dict, dict]:
    """(dvc.lock, metrics/evaluate.json) of the first `cdc repro`."""
    ws, _ = workspace
    return yaml.safe_load((ws / "dvc.lock").read_text()), json.loads(
        (ws / "metrics/evaluate.json").read_text()
    )


def copy_workspace(workspace: tuple[Path, dict[str, str]], dest: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the finished tiny workspace at `dest` (its git, DVC cache and MLflow store too), and the
    environment that tracks into the copy's store."""
    ws, env = workspace
    shutil.copytree(ws, dest, symlinks=True)
    return dest, {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{dest / 'mlflow.db'}"}


@pytest.fixture
def repro_copy(workspace: tuple[Path, dict[str, str]], first_repro: str, tmp_path: Path) -> tuple[Path, dict]:
    """This test's own copy of the finished tiny workspace, free to change."""
    return copy_workspace(workspace, tmp_path / "repo")


# The slowest files first, so that the two xdist workers (`make test`) end together: the one that builds the
# shared tiny workspace, then the heavy ones that do not need it while it is built. The rest keep their order.
SLOW_FILES_FIRST = (
    "test_reliability.py",
    "test_kfp.py",
    "test_compare.py",
    "test_kfp_streamed.py",
    "test_distributed.py",
    "test_lineage.py",
    "test_datasets.py",
    "test_experiments.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """`make reliability` sets CDC_RELIABILITY_RECORD: the cases tried go to docs/reliability.md."""
    from tests import reliability_record

    target = os.environ.get(reliability_record.RECORD_ENV)
    if target and reliability_record.CASES:
        args = " ".join(session.config.invocation_params.args)
        command = f"{reliability_record.RECORD_ENV}={target} pytest {args}".strip()
        reliability_record.write(REPO / target, command)
