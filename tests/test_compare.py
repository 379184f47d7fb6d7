"""`cdc compare` end to end on the tiny profile: real `dvc repro` cells, the report and its resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.compare import METHOD_BY_NAME, PROFILES, cell_params, uniform_ratio_for
from tests.conftest import RAW, REPO, clean_env, run_ok

pytestmark = pytest.mark.e2e


def test_uniform_ratio_for_meets_each_budget_within_a_percent():
    from cdc.flops import count_macs
    from cdc.models import build_model
    from cdc.pruning import keep_counts

    model = build_model("resnet20", 10, 1)
    names, widths = [layer.name for layer in model.prunable_layers()], model.widths()
    full = count_macs(model, (1, 28, 28))
    for removed in PROFILES["default"]["flops_removed"]:
        ratio = uniform_ratio_for("resnet20", 10, (1, 28, 28), removed)
        keep = keep_counts("uniform", names, widths, {"ratio": ratio})
        kept = count_macs(build_model("resnet20", 10, 1, keep), (1, 28, 28)) / full
        assert abs(kept - (1 - removed)) <= 0.01, (removed, ratio, kept)


def test_compare_runs_cells_through_dvc_and_writes_the_report(tmp_path: Path):
    out = tmp_path / "docs" / "results.md"
    cmd = [sys.executable, "-m", "pipeline.cli", "compare", "--profile", "tiny", "--methods", "cdc", "l1"]
    cmd += ["--workspace", str(tmp_path / "ws"), "--out", str(out), "--raw", str(RAW)]
    env = clean_env(tmp_path / "unused.db")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "docs" / "results" / "compare_tiny.json").read_text())
    cells = {(r["method"], r["flops_removed"]): r for r in rows}
    assert sorted(cells) == [("cdc", 0.5), ("cdc", 0.6), ("l1", 0.5), ("l1", 0.6)]
    for removed in (0.5, 0.6):
        cdc, l1 = cells[("cdc", removed)], cells[("l1", removed)]
        # matched budget: the same widths and FLOPs for both methods, near the target
        assert cdc["widths"] == l1["widths"] and cdc["flops_ratio"] == l1["flops_ratio"]
        assert abs(cdc["flops_ratio"] - (1 - removed)) <= 0.01
        assert cdc["fine_tuned"] == l1["fine_tuned"] == (removed == 0.5)  # the profile's fine-tune budget
    assert len({r["teacher_test"] for r in rows}) == 1  # one teacher, trained once
    for r in rows:
        assert 0 <= r["pruned_test"] <= 1 and 0 <= r["student_test"] <= 1
    text = out.read_text()
    assert "CDC: hierarchical symdiv + KD + DCA" in text and "filter L1 norm" in text
    assert "Paired with the best data-free baseline" in text and "cdc compare --profile tiny" in text
    assert (tmp_path / "docs" / "results" / "tiny_student_test.png").stat().st_size > 0
    ws = tmp_path / "ws" / "seed-0"
    assert (ws / "dvc.lock").exists() and (ws / "mlflow.db").exists()

    # a prune-only cell measured in-process equals what the evaluate stage reports for the same cell
    po = cells[("cdc", 0.6)]
    params = cell_params(PROFILES["tiny"], METHOD_BY_NAME["cdc"], 0, po["ratio"], fine_tune=False)
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    run_ok([sys.executable, "-m", "dvc", "repro"], ws, env | {"PYTHONPATH": str(ws)})
    metrics = json.loads((ws / "metrics" / "evaluate.json").read_text())
    for model in ("teacher", "pruned"):
        for split in ("test", "val"):
            assert metrics[model][f"{split}_acc"] == po[f"{model}_{split}"], (model, split)

    # resuming: every cell is in the rows file, so nothing runs again
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4 cells (4 done)" in again.stderr
    assert json.loads((tmp_path / "docs" / "results" / "compare_tiny.json").read_text()) == rows
