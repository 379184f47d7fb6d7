"""End to end: the real `dvc repro` over every stage in a temporary git + DVC copy of the repository,
with a tiny params profile, tracked in a real MLflow SQLite store."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from components.stages import STAGE_BY_NAME, STAGES
from tests.conftest import run_ok as _run

pytestmark = pytest.mark.e2e


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([a-z_]+)'", output)


def test_repro_runs_every_stage_and_writes_every_output(workspace, first_repro):
    ws, _ = workspace
    assert _stages_run(first_repro) == [s.name for s in STAGES]
    for stage in STAGES:
        for path in stage.outputs.values():
            assert (ws / path).exists(), f"{stage.name} did not write {path}"
    assert "| student (distilled) |" in first_repro  # the summary table is printed
    metrics = json.loads((ws / STAGE_BY_NAME["evaluate"].outputs["metrics"]).read_text())
    for model in ("teacher", "pruned", "student"):
        assert {"test_acc", "flops", "params", "latency_ms_b1", "latency_ms_b64"} <= set(metrics[model])
    assert metrics["pruned"]["flops"] == metrics["student"]["flops"] < 0.5 * metrics["teacher"]["flops"]
    # latency measured interleaved in the deployment form, each speed-up with its spread
    assert metrics["latency_form"] == "folded" and metrics["latency_threads"] >= 1
    ratios = metrics["student_vs_teacher"]
    assert ratios["speedup_b1"] > 0 and ratios["speedup_b64_spread"] >= 0
    plots = sorted(p.name for p in (ws / "data/evaluate/plots").iterdir())
    assert plots == ["accuracy_vs_flops.png", "training_curves.png", "widths.png"]
    assert all((ws / "data/evaluate/plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)
    report = (ws / "data/evaluate/report.md").read_text()
    assert "| student (distilled) |" in report and "folded form" in report and "x ± " in report
    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    # every stage, in any order: DVC appends a stage the committed dvc.lock lacks at its end
    assert sorted(lock["stages"]) == sorted(s.name for s in STAGES)


def test_mlflow_holds_a_pipeline_run_with_a_nested_run_per_stage(workspace, first_repro):
    ws, env = workspace
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("cdc")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("cdc.stage") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["cdc.stage"] for r in children) == sorted(s.name for s in STAGES)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ws, capture_output=True, text=True).stdout.strip()
    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    compared = 0
    for run in children:
        stage = run.data.tags["cdc.stage"]
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.source.git.commit"].startswith(head)
        assert any(k.startswith("cdc.input.") and k.endswith(".md5") for k in run.data.tags)
        assert run.data.params, f"{stage} logged no params"
        # every cached file output's md5 is the one dvc.lock recorded: MLflow and DVC agree on lineage
        for out in lock["stages"][stage].get("outs", []):
            name = next(
                k for k, v in next(s for s in STAGES if s.name == stage).outputs.items() if v == out["path"]
            )
            if (
                out["path"].endswith("/")
                or "nfiles" in out
                or "md5" not in out
                or out["md5"].endswith(".dir")
            ):
                continue
            assert run.data.tags[f"cdc.output.{name}.md5"] == out["md5"], (stage, name)
            compared += 1
    assert compared >= 10
    teacher = next(r for r in children if r.data.tags["cdc.stage"] == "train_teacher")
    history = client.get_metric_history(teacher.info.run_id, "val_acc")
    assert [m.step for m in history] == [1]


def test_second_repro_reruns_nothing(workspace, first_repro):
    ws, env = workspace
    out = _run(["dvc", "repro"], ws, env)
    assert _stages_run(out) == []


def test_forced_rerun_gives_byte_identical_statistics_scores_and_widths(repro_copy):
    """Same params on CPU -> the same bytes: lineage audits compare hashes."""
    ws, env = repro_copy

    def hashes() -> dict[str, str]:
        lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
        return {o["path"]: o["md5"] for name in ("dump_stats", "score") for o in lock[name]["outs"]}

    before = hashes()
    out = _run(["dvc", "repro", "--force", "--single-item", "dump_stats"], ws, env)
    assert _stages_run(out) == ["dump_stats"]
    _run(["cdc", "score"], ws, env)  # rewrites the scores outside DVC; widths are a function of them
    assert {path: _md5(ws / path) for path in before} == before
    assert hashes() == before


def test_a_code_change_reruns_the_stage_that_runs_it_and_a_test_change_nothing(repro_copy):
    """dvc.yaml lists the code each stage runs (`components.stages.code_dependencies`): a module only
    `score` imports changes `score` alone (what follows reruns if its outputs change, DVC's rule); a
    change to a test file, which no stage runs, changes nothing."""
    ws, env = repro_copy
    with (ws / "tests" / "test_hierarchy.py").open("a") as fh:
        fh.write("\n# touched\n")
    assert "Data and pipelines are up to date" in _run(["dvc", "status"], ws, env)
    with (ws / "cdc" / "hierarchy.py").open("a") as fh:
        fh.write("\n# touched\n")
    status = json.loads(
        subprocess.run(["dvc", "status", "--json"], cwd=ws, env=env, capture_output=True, text=True).stdout
    )
    assert list(status) == ["score"]
    assert status["score"] == [{"changed deps": {"cdc/hierarchy.py": "modified"}}]
    assert _stages_run(_run(["dvc", "repro"], ws, env)) == ["score"]  # the same scores: nothing after
