"""`prune.budget: latency_target` end to end under the real `dvc repro`, on the tiny profile: the table
is measured on this CPU, the pruned model's predicted latency is at or under the target, and the table is
an artifact DVC keys by its target: restored from DVC's cache, not measured again, when a target measured
before comes back. Whether the budget buys more speed than FLOPs do is bench/latency_budget.py's question."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from cdc.latency_model import LatencyTable
from tests.conftest import run_ok

pytestmark = pytest.mark.e2e


def _set(ws: Path, **sections: dict) -> None:
    params = yaml.safe_load((ws / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    (ws / "params.yaml").write_text(yaml.safe_dump(params))


def _stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([a-z_]+)'", output)


def test_latency_target_end_to_end_and_the_table_comes_back_from_dvc_cache(repro_copy):
    ws, env = repro_copy
    stub = json.loads((ws / "data/latency/table.json").read_text())
    assert stub["measured"] is False and "uniform" in stub["reason"]  # the default budget reads none

    target = {"device": "cpu", "batch_size": 2, "threads": 1, "step": 8, "rounds": 3}
    _set(ws, prune={"budget": "latency_target"}, latency=target)
    assert _stages_run(run_ok(["cdc", "repro", "latency_table"], ws, env)) == ["latency_table"]
    table = LatencyTable.load(ws / "data/latency/table.json")
    assert table is not None and (table.batch, table.threads, table.device) == (2, 1, "cpu")
    # a target this machine's table can reach (how far narrowing goes at batch 2 is the machine's):
    # halfway between the narrowest widths' predicted latency and the teacher's
    narrowest = [table.fast_widths(i)[0] for i in range(len(table.layers))]
    floor = table.predict(narrowest) / table.predict(table.widths)
    assert floor < 0.98, f"no width saves time in this table: {table.ms}"
    goal = round((1 + floor) / 2, 2)
    _set(ws, prune={"latency_target": goal})
    out = run_ok(["cdc", "repro", "evaluate"], ws, env)  # not export: it reads nothing of the budget
    assert _stages_run(out) == ["prune", "fit_dca", "distill", "evaluate"]  # the table is the same
    report = json.loads((ws / "data/prune/report.json").read_text())
    assert report["budget"] == "latency_target" and report["latency_target"] == goal
    assert report["predicted_latency_ratio"] <= goal
    assert report["predicted_latency_ms_after"] == pytest.approx(table.predict(report["widths_after"]))
    assert all(w in table.fast_widths(i) for i, w in enumerate(report["widths_after"]))
    metrics = json.loads((ws / "metrics/evaluate.json").read_text())["student_vs_teacher"]
    assert metrics["predicted_latency_ratio"] == report["predicted_latency_ratio"]
    assert f"Latency budget: at most {100 * goal:.0f}%" in (ws / "data/evaluate/report.md").read_text()

    first = (ws / "data/latency/table.json").read_bytes()
    _set(ws, latency={"batch_size": 3})  # another target: measured
    assert _stages_run(run_ok(["cdc", "repro", "latency_table"], ws, env)) == ["latency_table"]
    assert LatencyTable.load(ws / "data/latency/table.json").batch == 3
    _set(ws, latency={"batch_size": 2})  # back to the first target: DVC's run cache, not a measurement
    out = run_ok(["cdc", "repro", "latency_table"], ws, env)
    assert "Stage 'latency_table' is cached - skipping run, checking out outputs" in out
    assert (ws / "data/latency/table.json").read_bytes() == first
