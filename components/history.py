"""Per-epoch history: logged to MLflow and the log, written as CSV (a DVC plot)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from cdc.io import atomic_path
from components.tracking import StageTracker

log = logging.getLogger(__name__)


def record_epoch(
    history: list[dict[str, float]], tracker: StageTracker, who: str, epochs: int, row: dict
) -> None:
    """Append `row` (with an `epoch` key) to `history`, log its metrics at that step and one line."""
    history.append(row)
    tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])
    log.info(
        "%s epoch %d/%d: train acc %.4f, val acc %.4f",
        who,
        row["epoch"],
        epochs,
        row["train_acc"],
        row["val_acc"],
    )


def write_history(path: Path, rows: list[dict[str, float]]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
