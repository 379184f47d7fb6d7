"""The latency table (cdc/latency_model.py): its additive prediction, written out by hand, and a real
measurement's shape. How well it predicts is bench/latency_table.py's question, never a test's."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdc.latency_model import LatencyTable, measure_models, measure_table, width_steps
from cdc.models import build_model


def hand_table() -> LatencyTable:
    return LatencyTable(
        arch="x",
        device="cpu",
        threads=1,
        batch=64,
        form="folded",
        input_shape=[1, 28, 28],
        full_ms=10.0,
        layers=["a", "b"],
        widths=[16, 32],
        steps=[[8, 16], [8, 16, 24, 32]],
        ms=[[9.0, 10.0], [6.0, 8.0, 9.5, 10.0]],
    )


def test_prediction_is_the_full_time_plus_each_layers_change():
    table = hand_table()
    assert table.predict([16, 32]) == 10.0
    assert table.predict([8, 32]) == 9.0
    assert table.predict([8, 16]) == 10.0 + (9.0 - 10.0) + (8.0 - 10.0)
    assert table.predict([12, 28]) == pytest.approx(10.0 + (9.5 - 10.0) + (9.75 - 10.0))  # linear between
    with pytest.raises(ValueError, match="2 prunable layers"):
        table.predict([8])


def test_a_table_round_trips_through_json(tmp_path: Path):
    table = hand_table()
    table.save(tmp_path / "t.json")
    again = LatencyTable.load(tmp_path / "t.json")
    assert again == table and again.key()["batch"] == 64


def test_width_steps():
    assert width_steps(32, 8) == [8, 16, 24, 32]
    assert width_steps(20, 8) == [8, 16, 20]
    assert width_steps(4, 8) == [4]


def test_a_measured_table_covers_every_layer_and_step():
    def build(widths: list[int]):
        return build_model("resnet20", 10, 1, widths)

    full = build(None)  # type: ignore[arg-type]
    names = [layer.name for layer in full.prunable_layers()]
    widths = full.prunable_widths()
    table = measure_table(build, "resnet20", names, widths, [1, 28, 28], 2, 32, n_threads=1, rounds=3)
    assert table.layers == names and table.steps == [width_steps(w, 32) for w in widths]
    assert all(len(row) == len(s) and min(row) > 0 for row, s in zip(table.ms, table.steps, strict=True))
    assert table.predict(widths) == pytest.approx(table.full_ms) and table.threads == 1
    times = measure_models(
        build, {"full": widths, "half": [w // 2 for w in widths]}, [1, 28, 28], 2, rounds=3
    )
    assert set(times) == {"full", "half"} and min(times.values()) > 0
