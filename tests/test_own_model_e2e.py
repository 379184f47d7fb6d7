"""A user's own CNN, defined in a file of the workspace (not in cdc), and a checkpoint trained outside the
pipeline go through `cdc repro` as they are: `train_teacher.epochs: 0` imports the checkpoint, every
stage runs on the discovered layers, and changing the checkpoint file reruns from the teacher."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from cdc.discovery import FUNCTION, PRUNABLE, discover
from cdc.stats_table import read_stats
from tests.workspace import run_ok

pytestmark = pytest.mark.e2e

# Functional ReLUs in a residual block, a plain conv chain, a Linear head: what a user writes.
TINYNET = """
import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class TinyNet(nn.Module):
    def __init__(self, num_classes, width=8):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.stage1 = Block(width)
        self.down = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, 1, 1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        )
        self.stage2 = Block(2 * width)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build(num_classes, width=8):
    return TinyNet(num_classes, width)
"""


def user_module(path: Path):  # noqa: ANN201 - the user's module, imported from its file (not through cdc)
    spec = importlib.util.spec_from_file_location("user_tinynet", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def normalized(ws: Path, split: str) -> tuple[torch.Tensor, np.ndarray]:
    meta = json.loads((ws / "data/prepared/meta.json").read_text())
    with np.load(ws / f"data/prepared/{split}.npz") as z:
        images, labels = z["images"].astype(np.float32) / 255.0, z["labels"]
    mean, std = (np.asarray(meta[k], np.float32).reshape(1, -1, 1, 1) for k in ("mean", "std"))
    return torch.from_numpy((images - mean) / std), labels


def train_outside(ws: Path, steps: int, seed: int) -> None:
    """The user's own training (plain PyTorch on the prepared images), saved as a state dict."""
    torch.manual_seed(seed)
    model = user_module(ws / "models/tinynet.py").build(10)
    x, y = normalized(ws, "train")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(steps):
        idx = torch.from_numpy(np.random.default_rng(step).choice(len(y), 64, replace=False))
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), torch.from_numpy(y)[idx]).backward()
        optimizer.step()
    torch.save(model.state_dict(), ws / "models/tinynet.pt")


def test_a_user_model_file_and_checkpoint_go_through_dvc_repro_without_teacher_training(repro_copy):
    ws, env = repro_copy
    (ws / "models/tinynet.py").write_text(TINYNET)
    train_outside(ws, steps=30, seed=0)
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["train_teacher"].update(arch="models.tinynet:build", epochs=0, init_checkpoint="models/tinynet.pt")
    params["fit_dca"]["layer"] = "stage1"
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    out = run_ok(["cdc", "repro"], ws, env)
    assert "teacher imported as it is" in out

    # the recorded accuracy is the checkpoint's, evaluated here by plain PyTorch on the validation split
    model = user_module(ws / "models/tinynet.py").build(10)
    model.load_state_dict(torch.load(ws / "models/tinynet.pt", weights_only=True))
    x, y = normalized(ws, "val")
    with torch.no_grad():
        predicted = torch.cat([model.eval()(x[i : i + 512]) for i in range(0, len(y), 512)]).argmax(1).numpy()
    teacher = json.loads((ws / "metrics/teacher.json").read_text())
    assert teacher["val_acc"] == float((predicted == y).mean())

    # every stage ran on the discovered layers: the functional ReLUs are applied to the hooked BN output
    report = json.loads((ws / "data/prune/report.json").read_text())
    assert report["layers"] == ["stage1.conv1", "down.0", "stage2.conv1"]
    found = {d["name"]: d for d in report["layer_discovery"]}
    assert found["stage1.conv1"]["hooked"] == f"{FUNCTION} relu" and found["stem.0"]["status"] == "residual"
    assert found["down.3"]["status"] == "residual"
    assert all(a < b for a, b in zip(report["widths_after"], report["widths_before"], strict=True))
    groups = json.loads((ws / "data/score/groups.json").read_text())
    assert [b["block"] for b in groups["blocks"]] == ["stage1", "down.0", "stage2"]
    evaluation = json.loads((ws / "metrics/evaluate.json").read_text())
    assert evaluation["student"]["flops"] < evaluation["teacher"]["flops"]
    export = json.loads((ws / "data/export/report.json").read_text())
    assert export["checks"]["onnx"]["same_class"] == 1.0

    # the statistics of two torchrun processes are those of one, on the discovered tensors
    outs = ["--stats", "s2.parquet", "--grid", "g2.parquet", "--confusion", "c2.json"]
    run_ok(["cdc", "dump_stats", "--nproc", "2", *outs], ws, env)
    one, two = read_stats(ws / "data/stats/stats.parquet"), read_stats(ws / "s2.parquet")
    assert list(one) == list(two) == report["layers"]
    for name in one:
        assert np.array_equal(one[name].n, two[name].n)
        np.testing.assert_allclose(two[name].s2, one[name].s2, rtol=1e-10)

    # another checkpoint under the same name: DVC reruns from the teacher
    run_ok(["git", "add", "-A"], ws, env)
    run_ok(["git", "commit", "-qm", "own model"], ws, env)
    train_outside(ws, steps=31, seed=0)
    status = json.loads(run_ok(["dvc", "status", "--json"], ws, env).strip().splitlines()[-1])
    assert "prepare" not in status
    assert {"changed deps": {"models": "modified"}} in status["train_teacher"]


def test_discovery_applies_a_functional_activation_and_skips_no_conv(tmp_path: Path):
    (tmp_path / "tinynet.py").write_text(TINYNET)
    model = user_module(tmp_path / "tinynet.py").build(10)
    found = discover(model, torch.zeros(1, 1, 28, 28))
    assert [d.name for d in found if d.status == PRUNABLE] == ["stage1.conv1", "down.0", "stage2.conv1"]
    assert [d.function for d in found if d.status == PRUNABLE] == ["relu", None, "relu"]
    assert len(found) == sum(isinstance(m, nn.Conv2d) for m in model.modules())
