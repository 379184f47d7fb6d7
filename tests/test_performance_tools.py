"""The tools behind the performance figures: FLOPs convention, hardware-friendly widths, inference
forms that compute the same function, and a latency comparison that two equal models pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cdc.flops import count_macs
from cdc.inference import fold_batchnorm, inference_forward
from cdc.latency import compare_latency
from cdc.models import build_model
from cdc.pruning import keep_counts, round_widths
from tests.conftest import batches


@pytest.mark.parametrize(
    ("layer", "shape", "macs"),
    [
        # out pixels x out channels x in channels per group x kernel area; bias adds not counted
        (nn.Conv2d(3, 8, 3, padding=1), (3, 10, 10), 10 * 10 * 8 * 3 * 9),
        (nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), (3, 10, 10), 5 * 5 * 8 * 3 * 9),
        (nn.Conv2d(8, 8, 3, padding=1, groups=4), (8, 6, 6), 6 * 6 * 8 * 2 * 9),
        (nn.Conv2d(8, 8, 3, padding=1, groups=8), (8, 6, 6), 6 * 6 * 8 * 1 * 9),  # depthwise
        (nn.Conv2d(4, 2, 1), (4, 7, 5), 7 * 5 * 2 * 4),
        (nn.Sequential(nn.Flatten(), nn.Linear(12, 5)), (3, 2, 2), 12 * 5),
        # BN, ReLU, pooling cost nothing under the convention
        (nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.AdaptiveAvgPool2d(1)), (3, 4, 4), 0),
    ],
)
def test_macs_of_known_layers(layer: nn.Module, shape: tuple[int, ...], macs: int) -> None:
    assert count_macs(layer, shape) == macs


def test_round_widths_are_multiples_within_bounds():
    widths = [16, 16, 32, 64, 6]
    keep = [8, 7, 15, 29, 3]
    assert round_widths(keep, widths, 8) == [8, 8, 16, 32, 6]  # 29 -> 32 (nearest), 6 < 8 stays
    assert round_widths(keep, widths, 1) == keep
    assert round_widths([12], [16], 8) == [16]  # ties round up, never beyond the width
    assert round_widths([2], [64], 8) == [8]  # never below one multiple
    for k, w in zip(round_widths([3, 17, 40, 50], [64] * 4, 16), [64] * 4, strict=True):
        assert k % 16 == 0 and 16 <= k <= w
    assert keep_counts("uniform", ["a", "b"], [16, 32], {"ratio": 0.53, "round_to": 8}) == [8, 16]
    with pytest.raises(ValueError, match="round_to"):
        round_widths([3], [8], 0)


@pytest.mark.parametrize("form", ["folded", "folded_channels_last", "onnxruntime"])
def test_inference_forms_compute_the_teacher_function(form: str, small_split) -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 1, [4, 4, 4, 8, 8, 8, 16, 16, 16]).eval()
    with torch.no_grad():  # non-trivial BN statistics, so folding has something to fold
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    x = next(iter(batches(small_split, 8)))[0]
    want = model(x).detach().numpy()
    got = inference_forward(model, form, x)()
    got = got[0] if isinstance(got, list) else got.detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fold_batchnorm(model).modules())


def test_two_models_of_one_architecture_agree_within_the_spread():
    """Same widths, different weights: the measured speed-up of one over the other is 1 within the
    reported spread (the interleaved measurement cancels the machine's drift)."""
    torch.manual_seed(0)
    widths = [8, 8, 8, 16, 16, 16, 32, 32, 32]
    a, b = (build_model("resnet20", 10, 1, widths).eval() for _ in range(2))
    x = torch.randn(4, 1, 28, 28)
    lat = compare_latency({"a": lambda: a(x), "b": lambda: b(x)}, rounds=21, block_ms=10.0)
    assert lat["a"].speedup == 1.0
    r = lat["b"]
    assert r.speedup_p25 <= r.speedup <= r.speedup_p75
    assert abs(r.speedup - 1.0) <= max(r.spread, 0.03), r
