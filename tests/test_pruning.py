"""Pruning removes exactly the lowest-scored channels, physically, and the result reloads safely."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from cdc import pruning
from cdc.errors import InputError
from cdc.flops import count_macs, count_params
from cdc.io import load_model, save_model
from cdc.models import MODELS, build_model
from cdc.params import Params
from cdc.pruning import (
    BUDGETS,
    BudgetReads,
    budget_reads,
    channels_to_remove,
    keep_counts,
    prune_channels,
    register_budget,
)
from tests.conftest import REPO

SHAPE = (1, 28, 28)


def test_channels_to_remove_are_the_lowest():
    scores = np.array([0.5, 0.1, 0.9, 0.1, 0.7, 0.3])
    assert channels_to_remove(scores, keep=3) == [1, 3, 5]
    assert channels_to_remove(scores, keep=6) == []


def test_budgets():
    assert keep_counts("uniform", ["a", "b"], [16, 64], {"ratio": 0.5}) == [8, 32]
    assert keep_counts("uniform", ["a"], [4], {"ratio": 0.99}) == [1]  # never an empty layer
    assert keep_counts("per_layer", ["a", "b"], [16, 64], {"ratios": [0.25, 0.0]}) == [12, 64]
    with pytest.raises(ValueError, match="one ratio per prunable layer"):
        keep_counts("per_layer", ["a", "b"], [16, 64], {"ratios": [0.25]})
    with pytest.raises(InputError, match="unknown budget 'nope'; known budgets: .*uniform"):
        keep_counts("nope", ["a"], [4], {})


def test_a_budget_declares_what_it_reads_and_the_stages_follow(monkeypatch):
    """A budget declares what it reads where it registers (prune and latency_table measure accuracy or a
    table only for those that read them; tests/test_latency_budget.py: none for uniform), and the params
    rules follow the declaration, for a user's budget too."""
    assert budget_reads("uniform") == BudgetReads()
    assert budget_reads("flops_target") == BudgetReads(accuracy=True, flops_target=True)
    assert budget_reads("latency_target") == BudgetReads(accuracy=True, latency=True)
    with pytest.raises(InputError, match="unknown budget 'nope'"):
        budget_reads("nope")
    monkeypatch.setattr(BUDGETS, "_entries", dict(BUDGETS._entries))  # registered for this test only
    monkeypatch.setattr(pruning, "_READS", dict(pruning._READS))

    @register_budget("latency_halves", BudgetReads(latency=True))
    def latency_halves(names, widths, params, probe=None):
        return [max(1, w // 2) for w in widths]

    assert budget_reads("latency_halves").latency and not budget_reads("latency_halves").accuracy
    prune = {"budget": "latency_halves", "round_to": 3}  # must divide latency.step (8), as latency_target's
    with pytest.raises(ValueError, match="round_to 3 must divide latency.step 8"):
        Params.model_validate({"prune": prune})
    assert Params.model_validate({"prune": {**prune, "round_to": 4}}).prune.budget == "latency_halves"


def _perturbed(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(arch, 10, 1).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.bias.uniform_(-0.3, 0.3)
    return model


@pytest.mark.parametrize("arch", ["resnet20", "vgg_small"])
def test_pruned_model_equals_original_with_removed_channels_silenced(arch):
    """Zeroing a channel's BN scale and shift makes its post-ReLU output 0; removing it must then be exact."""
    model = _perturbed(arch)
    rng = np.random.default_rng(0)
    removals = {
        layer.name: sorted(
            rng.choice(layer.conv.out_channels, layer.conv.out_channels // 2, replace=False).tolist()
        )
        for layer in model.prunable_layers()
    }
    silenced = _perturbed(arch)
    with torch.no_grad():
        for layer in silenced.prunable_layers():
            bn = silenced.get_submodule(layer.name + (".bn1" if arch.startswith("resnet") else ""))
            if not isinstance(bn, torch.nn.BatchNorm2d):  # VGG: the BN right after the conv
                idx = int(layer.name.split(".")[1]) + 1
                bn = silenced.features[idx]
            bn.weight[removals[layer.name]] = 0.0
            bn.bias[removals[layer.name]] = 0.0
    kept = {layer.name: layer.conv.weight.detach().clone() for layer in model.prunable_layers()}
    prune_channels(model, removals, SHAPE)
    previous_keep = None
    for layer in model.prunable_layers():
        keep = [i for i in range(kept[layer.name].shape[0]) if i not in removals[layer.name]]
        expected = kept[layer.name][keep]
        if arch.startswith("vgg") and previous_keep is not None:  # VGG convs chain: inputs sliced too
            expected = expected[:, previous_keep]
        torch.testing.assert_close(layer.conv.weight, expected)
        previous_keep = keep
    x = torch.randn(4, *SHAPE)
    torch.testing.assert_close(model(x), silenced(x), rtol=1e-4, atol=1e-5)


def test_resnet20_widths_and_flops_after_pruning():
    model = build_model("resnet20", 10, 1)
    removals = {layer.name: list(range(layer.conv.out_channels // 2)) for layer in model.prunable_layers()}
    prune_channels(model, removals, SHAPE)
    assert model.prunable_widths() == [8] * 3 + [16] * 3 + [32] * 3
    # Hand count of MACs for 28x28 inputs (stage maps 28, 14, 7).
    stem = 28 * 28 * 1 * 16 * 9
    stage1 = 3 * (28 * 28 * (16 * 8 * 9 + 8 * 16 * 9))
    stage2 = 14 * 14 * (16 * 16 * 9 + 16 * 32 * 9 + 16 * 32) + 2 * 14 * 14 * (32 * 16 * 9 + 16 * 32 * 9)
    stage3 = 7 * 7 * (32 * 32 * 9 + 32 * 64 * 9 + 32 * 64) + 2 * 7 * 7 * (64 * 32 * 9 + 32 * 64 * 9)
    assert count_macs(model, SHAPE) == stem + stage1 + stage2 + stage3 + 64 * 10
    assert count_params(model) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_every_registered_model_prunes_and_runs(arch):
    model = build_model(arch, 10, 3)
    before = count_macs(model, (3, 32, 32))
    removals = {layer.name: [0] for layer in model.prunable_layers()}
    prune_channels(model, removals, (3, 32, 32))
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert count_macs(model, (3, 32, 32)) < before


def test_pruned_model_reloads_in_a_fresh_process(tmp_path):
    model = _perturbed("resnet20")
    prune_channels(model, {layer.name: [0, 3, 5] for layer in model.prunable_layers()}, SHAPE)
    path = tmp_path / "pruned.pt"
    save_model(path, model, "resnet20", 10, 1)
    x = torch.randn(3, *SHAPE)
    torch.save(x, tmp_path / "x.pt")
    torch.save(model(x).detach(), tmp_path / "y.pt")
    code = (
        "import torch, sys; from cdc.io import load_model;"
        f"m, rec = load_model(r'{path}');"
        f"x = torch.load(r'{tmp_path / 'x.pt'}', weights_only=True);"
        f"y = torch.load(r'{tmp_path / 'y.pt'}', weights_only=True);"
        "torch.testing.assert_close(m(x), y); print(rec['widths'])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str([13, 13, 13, 29, 29, 29, 61, 61, 61])
    loaded, _ = load_model(path)
    assert loaded.prunable_widths() == model.prunable_widths()
