"""Every model of the registry through what the pipeline does to it: prune about half of each prunable
layer, run it, count it, reload it in a fresh process with weights-only loading, hook its layers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from cdc.flops import count_macs
from cdc.io import load_initial_weights, save_model
from cdc.models import MODELS, build_model
from cdc.pruning import channels_to_remove, prune_channels
from cdc.stats import StatsCollector

INPUT = (1, 32, 32)  # grayscale 32 x 32: every registry model accepts it (torchvision stems are replaced)


def reference_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """MACs from the layers' shapes (independent of cdc.flops' dispatcher counting): a conv costs
    out_h * out_w * out_c * (in_c / groups) * kh * kw, a linear in * out."""
    total = 0

    def conv(m: nn.Conv2d, _i: tuple, out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = m.kernel_size
        total += out.shape[2] * out.shape[3] * m.out_channels * (m.in_channels // m.groups) * kh * kw

    def linear(m: nn.Linear, _i: tuple, _out: torch.Tensor) -> None:
        nonlocal total
        total += m.in_features * m.out_features

    handles = [
        m.register_forward_hook(conv if isinstance(m, nn.Conv2d) else linear)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *input_shape))
    for h in handles:
        h.remove()
    return total


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_every_model_prunes_runs_counts_reloads_and_is_hooked(arch: str, tmp_path: Path):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=7, in_channels=1)
    layers = model.prunable_layers()
    widths = model.prunable_widths()
    rng = np.random.default_rng(0)
    keep = [w - w // 2 for w in widths]
    removals = {
        layer.name: channels_to_remove(rng.random(w), k)
        for layer, w, k in zip(layers, widths, keep, strict=True)
    }
    before = count_macs(model, INPUT)
    prune_channels(model, removals, INPUT)

    assert model.prunable_widths() == keep
    assert count_macs(model, INPUT) == reference_macs(model, INPUT) < before
    assert count_macs(model, INPUT) == count_macs(build_model(arch, 7, 1, keep), INPUT)
    x = torch.randn(3, *INPUT)
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (3, 7) and torch.isfinite(logits).all()

    # the statistics hooks see exactly the declared layers, at their pruned widths
    with StatsCollector(model, 7) as collector, torch.no_grad():
        collector.labels = torch.tensor([0, 1, 2])
        model(x)
    stats = collector.stats()
    assert list(stats) == [layer.name for layer in model.prunable_layers()]
    assert [s.s1.shape[1] for s in stats.values()] == keep
    for name in model.feature_layers():  # DCA taps: unchanged by pruning (residual streams kept whole)
        assert model.get_submodule(name) is not None

    # a fresh process rebuilds it from the file alone, loading with weights_only
    save_model(tmp_path / "m.pt", model, arch, 7, 1)
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import sys, torch; from cdc.io import load_model; "
        "m, r = load_model(sys.argv[1]); x = torch.load(sys.argv[2], weights_only=True); "
        "torch.save(m(x).detach(), sys.argv[3])"
    )
    out = tmp_path / "y.pt"
    subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "m.pt"), str(tmp_path / "x.pt"), str(out)], check=True
    )
    assert torch.equal(torch.load(out, weights_only=True), logits)


@pytest.mark.parametrize(
    ("arch", "torchvision_model"),
    [
        ("resnet18", torchvision.models.resnet18),
        ("resnet50", torchvision.models.resnet50),
        ("mobilenet_v2", torchvision.models.mobilenet_v2),
    ],
)
def test_torchvision_weights_load_as_initial_weights(arch: str, torchvision_model: object, tmp_path: Path):
    """A torchvision state dict starts the registry's model: the same outputs; with another class count
    everything but the new head is loaded."""
    torch.manual_seed(0)
    reference = torchvision_model().eval()  # type: ignore[operator]
    torch.save(reference.state_dict(), tmp_path / "w.pth")
    model = build_model(arch, 1000, 3).eval()
    assert load_initial_weights(model, tmp_path / "w.pth") == []
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), reference(x), atol=1e-5)
    ten = build_model(arch, 10, 3)
    fresh = load_initial_weights(ten, tmp_path / "w.pth")
    assert len(fresh) == 2 and all(k.endswith(("weight", "bias")) for k in fresh)
    conv = next(
        k for k in reference.state_dict() if k.endswith("weight") and reference.state_dict()[k].ndim == 4
    )
    assert torch.equal(ten.state_dict()[conv], reference.state_dict()[conv])


def test_initial_weights_of_another_architecture_are_refused(tmp_path: Path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    from cdc.errors import InputError

    with pytest.raises(InputError, match="weights do not fit this architecture"):
        load_initial_weights(build_model("resnet50", 10, 3), tmp_path / "r18.pth")
