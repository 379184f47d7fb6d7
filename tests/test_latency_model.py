"""The latency table (cdc/latency_model.py): its additive prediction, written out by hand, and a real
measurement's shape. How well it predicts is bench/latency_table.py's question, never a test's."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdc.errors import InputError
from cdc.latency_model import LatencyTable, fit_additivity, measure_models, measure_table, width_steps
from cdc.models import build_model
from cdc.pruning import BudgetProbe, keep_counts


def table_of(
    full_ms: float, widths: list[int], steps: list[list[int]], ms: list[list[float]]
) -> LatencyTable:
    """A hand-made table of layers a, b, c, ... on one target."""
    layers = [chr(ord("a") + i) for i in range(len(widths))]
    return LatencyTable("x", "cpu", 1, 64, "folded", [1, 28, 28], full_ms, layers, widths, steps, ms)


def hand_table() -> LatencyTable:
    return table_of(10.0, [16, 32], [[8, 16], [8, 16, 24, 32]], [[9.0, 10.0], [6.0, 8.0, 9.5, 10.0]])


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


def test_additivity_is_the_least_squares_slope_and_a_noise_fit_falls_back_to_the_operators_sum(caplog):
    # summed per-layer changes -0.2 and -0.4; the whole networks measured -0.3 and -0.5:
    # slope through the origin (0.06 + 0.2) / (0.04 + 0.16) = 1.3, written out by hand
    assert fit_additivity([-0.2, -0.4], [-0.3, -0.5]) == pytest.approx(1.3)
    assert not caplog.records
    # narrowed networks timed no faster than the full one (a busy machine): not a property of the model
    assert fit_additivity([-0.2, -0.4], [0.001, -0.001]) == 1.0
    assert fit_additivity([-0.2, -0.4], [0.1, 0.2]) == 1.0  # negative: narrower would be slower
    assert fit_additivity([-0.2, -0.4], [-0.6, -1.2]) == 1.0  # 3x: beyond any cache effect measured
    assert len(caplog.records) == 3 and "outside [0.5, 2]" in caplog.records[0].getMessage()
    assert fit_additivity([0.0, 0.0], [-0.3, -0.5]) == 1.0  # nothing to scale


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


def stepped_table() -> LatencyTable:
    """Three layers; the last one's kernels step: 24 channels cost what 32 do (a real CPU's pattern)."""
    steps = [[8, 16], [8, 16, 24, 32], [8, 16, 24, 32]]
    ms = [[26.0, 30.0], [24.0, 26.0, 28.0, 30.0], [22.0, 29.0, 30.0, 30.0]]
    return table_of(30.0, [16, 32, 32], steps, ms)


def test_fast_widths_drop_a_width_no_faster_than_a_wider_one():
    table = stepped_table()
    assert table.fast_widths(0) == [8, 16]
    assert table.fast_widths(1) == [8, 16, 24, 32]
    assert table.fast_widths(2) == [8, 16, 32]  # 24 saves nothing over 32


def test_latency_target_meets_the_predicted_target_on_fast_widths_sparing_the_sensitive_layer():
    table = stepped_table()
    # cutting layer a costs much accuracy, b and c little: the time must come from b and c
    probe = BudgetProbe(
        lambda w: sum(w), [], accuracy=lambda k: 0.9 - 0.05 * (16 - k[0]) - 0.001 * (64 - k[1] - k[2])
    )
    probe.latency = table
    params = {"latency_target": 0.8, "sensitivity_step": 0.05, "round_to": 8}
    keep = keep_counts("latency_target", table.layers, table.widths, params, probe)
    assert table.predict(keep) <= 0.8 * table.full_ms
    assert keep[0] == 16
    assert all(k in table.fast_widths(i) for i, k in enumerate(keep))
    assert probe.trace[-1]["latency_ratio"] == pytest.approx(table.predict(keep) / table.full_ms)
    assert [t["latency_ratio"] for t in probe.trace] == sorted(
        (t["latency_ratio"] for t in probe.trace), reverse=True
    )


def test_an_unreachable_latency_target_names_the_key():
    table = stepped_table()
    probe = BudgetProbe(lambda w: sum(w), [], accuracy=lambda k: 0.5)
    probe.latency = table
    unreachable = "prune.latency_target 0.1: every layer is at its minimum width at .*; set a target above"
    with pytest.raises(InputError, match=unreachable):
        keep_counts(
            "latency_target",
            table.layers,
            table.widths,
            {"latency_target": 0.1, "sensitivity_step": 0.05},
            probe,
        )


def test_a_layers_operators_include_the_depthwise_conv_its_width_sets():
    """MobileNetV2 (discovered, not registered): narrowing an expansion conv changes that conv, the
    depthwise conv after it (its channels and groups) and the projection reading it; nothing else."""
    from cdc.latency_model import conv_shapes
    from cdc.models import Imported

    imported = Imported(image_size=(32, 32))
    full = build_model("torchvision.models:mobilenet_v2", 10, 3, imported=imported)
    widths = full.prunable_widths()
    names = [layer.name for layer in full.prunable_layers()]
    i = names.index("features.2.conv.0.0")  # block 2's expansion conv (1x1, 16 -> 96)
    narrowed = build_model(
        "torchvision.models:mobilenet_v2", 10, 3, [*widths[:i], 8, *widths[i + 1 :]], imported=imported
    )
    before, after = conv_shapes(full, (3, 32, 32)), conv_shapes(narrowed, (3, 32, 32))
    changed = sorted(n for n in before if before[n] != after[n])
    assert changed == ["features.2.conv.0.0", "features.2.conv.1.0", "features.2.conv.2"]
    depthwise = after["features.2.conv.1.0"]
    assert depthwise.groups == depthwise.in_channels == depthwise.out_channels == 8
    assert (
        after["features.2.conv.2"].in_channels == 8 and before["features.2.conv.2"].in_channels == widths[i]
    )
