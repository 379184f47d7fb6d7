"""Stage components through the real CLI (real MLflow on a temporary SQLite store)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from cdc.params import Params
from components.cli import main
from tests.conftest import RAW

TINY = {
    "data": {"train_limit": 300, "test_limit": 100, "val_size": 60},
    "train_teacher": {"epochs": 2, "batch_size": 64},
}


@pytest.fixture
def tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("CDC_PARENT_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump(Params.model_validate(TINY).model_dump()))
    assert main(["prepare", "--raw", str(RAW), "--prepared", "prepared"]) == 0
    return tmp_path


def _train(out: str) -> int:
    args = [
        "train_teacher",
        "--prepared",
        "prepared",
        "--model",
        f"{out}/model.pt",
        "--history",
        f"{out}/h.csv",
        "--metrics",
        f"{out}/m.json",
        "--checkpoints",
        f"{out}/ckpt",
    ]
    return main(args)


def test_resume_after_an_interruption_reproduces_the_uninterrupted_run(tiny: Path):
    assert _train("full") == 0
    # a finished run leaves nothing to resume
    assert sorted(p.name for p in Path("full/ckpt").iterdir()) == ["epoch_001.pt", "epoch_002.pt"]
    # Simulate a kill after epoch 1: only its checkpoint survives; a rerun resumes from it.
    Path("cut/ckpt").mkdir(parents=True)
    shutil.copy("full/ckpt/epoch_001.pt", "cut/ckpt/epoch_001.pt")
    shutil.copy("full/ckpt/epoch_001.pt", "cut/ckpt/last.pt")
    assert _train("cut") == 0
    full = torch.load("full/model.pt", weights_only=True)["state_dict"]
    resumed = torch.load("cut/model.pt", weights_only=True)["state_dict"]
    for key, value in full.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=key)
    assert Path("cut/h.csv").read_text() == Path("full/h.csv").read_text()


def test_missing_input_and_bad_params_fail_cleanly(tiny: Path, caplog: pytest.LogCaptureFixture):
    assert main(["dump_stats", "--prepared", "prepared", "--teacher", "absent.pt"]) == 2
    assert "absent.pt" in caplog.text
    Path("params.yaml").write_text("prune:\n  ratio: 2\n")
    assert main(["prune"]) == 2
    assert "prune.ratio" in caplog.text
    assert not Path("data/prune/model.pt").exists()


def test_missing_dataset_says_where_and_how(tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text("seed: 0\n")
    (tmp_path / "empty").mkdir()
    assert main(["prepare", "--raw", "empty", "--prepared", "prepared"]) == 2
    assert "FashionMNIST/raw" in caplog.text and "make data" in caplog.text
    assert not Path("prepared").exists()


def test_a_checkpoint_from_before_fingerprints_is_not_resumed(tmp_path: Path):
    """A `last.pt` an older cdc wrote (model and epoch, no fingerprint) cannot be matched to these params
    and inputs: the stage starts over (it used to stop `dvc repro` with 'pass --restart')."""
    from cdc.io import save_torch
    from components.checkpoint import Checkpoints

    save_torch(tmp_path / "last.pt", {"model": {}, "epoch": 3, "history": []})
    save_torch(tmp_path / "epoch_003.pt", {"model": {}, "epoch": 3})
    assert Checkpoints(tmp_path, "fingerprint-of-now").resume() is None
    assert list(tmp_path.iterdir()) == []


def test_the_teacher_starts_from_init_checkpoint(tiny: Path, caplog: pytest.LogCaptureFixture):
    """train_teacher.init_checkpoint: a state dict (here a torchvision-style one, `module.` prefixes of a
    DDP save included) starts the teacher; with a vanishing lr the trained weights are those weights."""
    import mlflow

    from cdc.models import build_model

    caplog.set_level("INFO")
    torch.manual_seed(123)
    start = build_model("resnet20", 10, 1).state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in start.items()}}, "start.pth")
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["train_teacher"].update(init_checkpoint="start.pth", lr=1e-12, epochs=1, warmup_epochs=0)
    Path("params.yaml").write_text(yaml.safe_dump(params))
    assert _train("init") == 0
    trained = torch.load("init/model.pt", weights_only=True)["state_dict"]
    for key in ("conv1.weight", "layer3.2.conv2.weight", "fc.weight"):
        torch.testing.assert_close(trained[key], start[key], rtol=0, atol=1e-9)
    assert "initial weights from start.pth" in caplog.text
    run = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`cdc.stage` = 'train_teacher'")
    assert (
        run["tags.cdc.init_checkpoint.md5"].iloc[0]
        == __import__("hashlib").md5(Path("start.pth").read_bytes()).hexdigest()
    )
