"""`cdc compare` end to end on the tiny profile: real `dvc repro` cells, the report and its resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cdc.latency_model import LatencyTable
from cdc.pruning import keep_counts
from tests.conftest import RAW, REPO, clean_env, run_ok
from tests.workspace import run_here
from tools.compare import METHOD_BY_NAME, PROFILES, cell_params, uniform_ratio_for
from tools.compare import cells as cells_of

pytestmark = pytest.mark.e2e


def test_uniform_ratio_for_meets_each_budget_within_a_percent():
    from cdc.flops import count_macs
    from cdc.models import build_model
    from cdc.pruning import keep_counts

    model = build_model("resnet20", 10, 1)
    names, widths = [layer.name for layer in model.prunable_layers()], model.prunable_widths()
    full = count_macs(model, (1, 28, 28))
    for removed in PROFILES["default"]["flops_removed"]:
        ratio = uniform_ratio_for("resnet20", 10, (1, 28, 28), removed)
        keep = keep_counts("uniform", names, widths, {"ratio": ratio})
        kept = count_macs(build_model("resnet20", 10, 1, keep), (1, 28, 28)) / full
        assert abs(kept - (1 - removed)) <= 0.01, (removed, ratio, kept)


def test_cells_fine_tune_every_budget_for_the_named_methods_last_and_share_pruned_only_twins():
    profile = PROFILES["extended"]
    methods = [METHOD_BY_NAME[m] for m in ("cdc", "cdc_no_dca", "cdc_ce", "cdc_eps", "l1", "fisher")]
    cells = [(m.name, removed, tuned) for m, removed, tuned in cells_of(profile, methods)]
    # the KD-only and CE-only rows prune like CDC: only their fine-tuned cells run
    assert [c for c in cells if c[0] in ("cdc_no_dca", "cdc_ce")] == [
        ("cdc_no_dca", 0.55, True),
        ("cdc_ce", 0.55, True),
    ]
    # ε 0.5 prunes differently: its own cells at every budget
    assert {c[1] for c in cells if c[0] == "cdc_eps"} == {0.40, 0.55, 0.70}
    everywhere = set(profile["finetune_everywhere"])
    for name, removed, tuned in cells:
        assert tuned == (removed == 0.55 or name in everywhere), (name, removed)
    extra = [i for i, (_, removed, tuned) in enumerate(cells) if tuned and removed != 0.55]
    assert extra == list(range(len(cells) - len(extra), len(cells)))  # the long fine-tunes come last
    params = cell_params(profile, METHOD_BY_NAME["cdc_eps"], 1, 0.3)
    assert params["score"]["eps"] == 0.5 and params["seed"] == 1 and params["prune"]["ratio"] == 0.3
    assert cell_params(profile, METHOD_BY_NAME["cdc_ce"], 1, 0.3)["distill"]["kd_weight"] == 0.0


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_profile_and_method_makes_valid_params(name: str):
    profile = PROFILES[name]
    assert set(profile["finetune_everywhere"]) <= set(METHOD_BY_NAME)
    assert set(profile["finetune_removed"]) <= set(profile["flops_removed"])
    for method in METHOD_BY_NAME.values():
        params = cell_params(profile, method, profile["seeds"][-1], 0.4)  # validated by Params
        assert params["score"]["criterion"] == method.criterion


def test_compare_runs_cells_through_dvc_and_writes_the_report(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    out = tmp_path / "docs" / "results.md"
    cmd = [sys.executable, "-m", "tools.cli", "compare", "--profile", "tiny", "--methods", "cdc", "l1"]
    cmd += ["--workspace", str(tmp_path / "ws"), "--out", str(out), "--raw", str(RAW)]
    env = clean_env(tmp_path / "unused.db")
    rows_path = tmp_path / "docs" / "results" / "compare_tiny.json"
    rows_path.parent.mkdir(parents=True)
    # a pruned-only row saved by an earlier profile that did not fine-tune l1 at 50%: the cell runs again
    # with its fine-tune and its row replaces this one
    earlier = {"method": "l1", "flops_removed": 0.5, "seed": 0, "fine_tuned": False, "pruned_test": 0.123}
    rows_path.write_text(json.dumps([earlier]))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(rows_path.read_text())
    cells = {(r["method"], r["flops_removed"]): r for r in rows}
    assert len(rows) == 4 and sorted(cells) == [("cdc", 0.5), ("cdc", 0.6), ("l1", 0.5), ("l1", 0.6)]
    assert cells[("l1", 0.5)]["replaces_pruned_test"] == 0.123
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
    plots = tmp_path / "docs" / "results"
    for plot in ("tiny_student_test_all.png", "tiny_pruned_test.png"):
        assert (plots / plot).stat().st_size > 0
    assert not (plots / "tiny_student_test.png").exists()  # no method is fine-tuned at two budgets
    latency = json.loads((tmp_path / "docs" / "results" / "compare_tiny_latency.json").read_text())
    assert sorted(latency) == ["0.5", "0.6"] and all(
        v["batch"]["64"]["speedup"] > 0 for v in latency.values()
    )
    assert "speed-up b1 / b64" in text
    ws = tmp_path / "ws" / "seed-0"
    assert (ws / "dvc.lock").exists() and (ws / "mlflow.db").exists()

    # a prune-only cell measured in-process equals what the evaluate stage reports for the same cell
    po = cells[("cdc", 0.6)]
    params = cell_params(PROFILES["tiny"], METHOD_BY_NAME["cdc"], 0, po["ratio"], fine_tune=False)
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    env = env | {"PYTHONPATH": str(ws)}
    said = run_ok([sys.executable, "-m", "dvc", "repro", "prune"], ws, env)
    assert "Stage 'prune' is cached - skipping run" in said  # the cell's pruned model, from DVC's run cache
    # its teacher and pruned accuracies, by the evaluate stage (they do not depend on the student)
    run_ok(["cdc", "evaluate", "--student", "data/prune/model.pt"], ws, env)
    metrics = json.loads((ws / "metrics" / "evaluate.json").read_text())
    for model in ("teacher", "pruned"):
        for split in ("test", "val"):
            assert metrics[model][f"{split}_acc"] == po[f"{model}_{split}"], (model, split)

    # resuming: every cell is in the rows file, so nothing runs again
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4 cells (4 done)" in again.stderr
    assert json.loads(rows_path.read_text()) == rows

    # a method fine-tuned at two budgets gets its curve: the report alone, from a row added by hand
    tuned = cells[("l1", 0.6)] | {"fine_tuned": True, "student_test": cells[("l1", 0.5)]["student_test"]}
    rows_path.write_text(json.dumps([r for r in rows if r is not cells[("l1", 0.6)]] + [tuned]))
    # the report keeps the date and machine the rows' run recorded, not the rewrite's
    run_record = plots / "compare_tiny_run.json"
    run = json.loads(run_record.read_text())
    assert run["command"] == "cdc compare --profile tiny --methods cdc l1" and run["date"] in text
    run_record.write_text(json.dumps(run | {"date": "1999-12-31", "machine": "the run's machine"}))
    report_only = [*cmd[3:], "--report-only"]
    assert run_here(report_only, REPO, env).returncode == 0
    assert (plots / "tiny_student_test.png").stat().st_size > 0
    rewritten = out.read_text()
    assert "![after fine-tune](results/tiny_student_test.png)" in rewritten
    assert "on 1999-12-31 (the run's machine)" in rewritten
    run_record.unlink()
    assert run_here(report_only, REPO, env).returncode == 2  # no record: no guessed date
    assert "compare_tiny_run.json not found" in caplog.text

    # matched by latency: the budgets are fractions of the latency a table measured here predicts; the
    # same workspace, so DVC reuses the teacher, statistics and scores
    by_latency = [*cmd[:6], "--methods", "cdc", "--match", "latency", "--workspace", str(tmp_path / "ws")]
    by_latency += ["--out", str(tmp_path / "docs" / "latency.md"), "--raw", str(RAW)]
    proc = subprocess.run(by_latency, cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    matched = json.loads((plots / "compare_tiny_latency_matched.json").read_text())
    table = LatencyTable.load(plots / "compare_tiny_latency_matched_table.json")
    assert table is not None and sorted(r["flops_removed"] for r in matched) == [0.5, 0.6]
    names = [f"layer{s}.{b}" for s in (1, 2, 3) for b in (0, 1, 2)]
    reachable = [  # every uniform cut's predicted fraction (a small batch's table has a high floor)
        table.predict(keep_counts("uniform", names, table.widths, {"ratio": x / 100})) / table.full_ms
        for x in range(96)
    ]
    for r in matched:
        assert r["match"] == "latency" and r["kept_ratio"] == table.predict(r["widths"]) / table.full_ms
        target = 1 - r["flops_removed"]
        assert abs(r["kept_ratio"] - target) <= min(abs(k - target) for k in reachable) + 0.01
    assert "| predicted latency cut (target → achieved) |" in (tmp_path / "docs" / "latency.md").read_text()
    assert (plots / "tiny_latency_matched_pruned_test.png").stat().st_size > 0  # beside the FLOPs-matched
