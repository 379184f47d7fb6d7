"""What every benchmark shares: the machine line, the target check, the JSON record and table printing.

Each benchmark writes bench/results/<name>.json with its measurements and a `targets` list
(figure, value, target, met) that bench/summary.py gathers into one table.
"""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

from cdc.device import machine_description as machine

RESULTS = Path(__file__).resolve().parent / "results"


def target(figure: str, value: float, op: str, bound: float, note: str = "") -> dict:
    """One figure against its target; `op` is '>=' or '<='."""
    met = value >= bound if op == ">=" else value <= bound
    return {"figure": figure, "value": value, "target": f"{op} {bound:g}", "met": bool(met), "note": note}


def reported(figure: str, value: float, note: str = "") -> dict:
    """A figure recorded without a target."""
    return {"figure": figure, "value": value, "target": "reported", "met": None, "note": note}


def write_result(name: str, result: dict, targets: list[dict], command: str) -> Path:
    record = {"date": date.today().isoformat(), "machine": machine(), "command": command, **result}
    record["targets"] = targets
    path = RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def stage_seconds(db: Path, stage: str) -> float:
    """`timing.stage_s` of the newest MLflow run of `stage` (rank 0's) in the store `db`."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{db}")
    runs = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.`cdc.stage` = '{stage}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return float(runs["metrics.timing.stage_s"].iloc[0])
