"""Per-epoch history: logged to MLflow and the log, written as CSV (a DVC plot)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from cdc.io import atomic_path
from cdc.train import EpochResult
from components.tracking import StageTracker

log = logging.getLogger(__name__)


def record_epoch(
    history: list[dict[str, float]],
    tracker: StageTracker,
    who: str,
    epoch: int,
    epochs: int,
    train: EpochResult,
    val: EpochResult,
    **extra: float,
) -> None:
    """Append the epoch's row to `history`, log its metrics at that step, and one log line."""
    row = {
        "epoch": epoch,
        "train_loss": train.loss,
        "train_acc": train.accuracy,
        **extra,
        "val_loss": val.loss,
        "val_acc": val.accuracy,
    }
    history.append(row)
    tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
    log.info("%s epoch %d/%d: train acc %.4f, val acc %.4f", who, epoch, epochs, train.accuracy, val.accuracy)


def write_history(path: Path, rows: list[dict[str, float]]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
