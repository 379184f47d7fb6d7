"""Every class discriminant ranks channels the right way round, on a network whose answer is known.

The network is a real ResNet-20 (the registry's) whose every conv is made block-diagonal between two
halves of its channels: the *signal* half sees only input channel 0, which carries the class (its
brightness is the class index plus noise); the *noise* half sees only input channel 1, which is
noise drawn alike for every class; the classifier reads the signal half only. So, by construction,
in every prunable layer the signal channels are class-discriminative, the noise channels are not
(yet they vary, so this is not the trivial dead-channel case), and the noise channels do not reach
the logits. Whatever the CPU's rounding, any correct discriminant, through the hierarchical scoring
with coarse and fine labels, must rank every signal channel above every noise channel; pruning the
lower half must then keep the network's logits, and pruning by the inverted ranking must not.

Which criterion keeps the most accuracy on a *trained* network depends on the teacher and the budget:
that is measured, with spreads, by `bench/scoring_quality.py`, `cdc compare` and
`bench/ranking_factors.py` (docs/results.md), never asserted here.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from cdc.criteria import CRITERIA
from cdc.models import PrunableNet, build_model
from cdc.pruning import channels_to_remove, prune_channels
from cdc.scoring import LayerScores, score_layers
from cdc.stats import collect_all_stats

CLASSES, PER_CLASS, SIDE = 10, 20, 28
SHAPE = (2, SIDE, SIDE)
FINE_TO_COARSE = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
COARSE_BLOCKS = 5  # ResNet-20's default T: blocks 1..5 coarse, 6..9 fine
DISCRIMINANTS = sorted(name for name, c in CRITERIA.items() if c.class_discriminant)


def planted_resnet20() -> PrunableNet:
    """ResNet-20 with block-diagonal convs (signal half | noise half), positive weights (no channel is
    dead after a ReLU) scaled to average their inputs, and a classifier blind to the noise half."""
    torch.manual_seed(0)
    model = build_model("resnet20", CLASSES, in_channels=2).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                out, inp = m.out_channels // 2, max(m.in_channels // 2, 1)
                w = torch.zeros_like(m.weight)
                for half in (0, 1):
                    rows, cols = slice(half * out, (half + 1) * out), slice(half * inp, (half + 1) * inp)
                    block = w[rows, cols]
                    block.copy_((1 + torch.rand_like(block)) / (1.5 * block[0].numel()))
                m.weight.copy_(w)
        model.fc.weight[:, model.fc.in_features // 2 :] = 0.0
    return model


def planted_batches(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Class k: channel 0 = 0.3 k + noise, channel 1 = noise only (same law for every class)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(CLASSES).repeat_interleave(PER_CLASS)
    x = torch.randn(len(y), *SHAPE, generator=g)
    x[:, 0] = 0.3 * y[:, None, None] + 0.5 * x[:, 0]
    order = torch.randperm(len(y), generator=g)
    x, y = x[order], y[order]
    return [(x[i : i + 50], y[i : i + 50]) for i in range(0, len(y), 50)]


@pytest.fixture(scope="module")
def planted() -> tuple[PrunableNet, dict, dict]:
    model = planted_resnet20()
    stats, grid = collect_all_stats(model, planted_batches(), CLASSES, grid=4)
    return model, stats, grid


@pytest.mark.parametrize("coarse_blocks", [COARSE_BLOCKS, 0], ids=["hierarchical", "fine"])
@pytest.mark.parametrize("discriminant", DISCRIMINANTS)
def test_every_discriminant_ranks_the_planted_signal_above_the_noise(planted, discriminant, coarse_blocks):
    model, stats, grid = planted
    source = grid if CRITERIA[discriminant].source == "grid" else stats
    scored = score_layers(source, discriminant, FINE_TO_COARSE, coarse_blocks, seed=0)
    levels = [s.level for s in scored]
    assert levels == ["coarse"] * coarse_blocks + ["fine"] * (len(scored) - coarse_blocks)
    for s in scored:
        half = len(s.scores) // 2
        assert s.scores[:half].min() > s.scores[half:].max(), (discriminant, s.layer, s.scores)


def _logits_after(model: PrunableNet, scored: list[LayerScores]) -> torch.Tensor:
    pruned = copy.deepcopy(model)
    removals = {s.layer: channels_to_remove(s.scores, len(s.scores) // 2) for s in scored}
    prune_channels(pruned, removals, SHAPE)
    assert pruned.prunable_widths() == [w // 2 for w in model.prunable_widths()]
    x = torch.cat([x for x, _ in planted_batches(seed=1)])  # images the scores never saw
    with torch.no_grad():
        return pruned.eval()(x)


def test_pruning_by_symdiv_keeps_the_logits_and_its_inverted_ranking_does_not(planted):
    model, stats, _ = planted
    scored = score_layers(stats, "symdiv", FINE_TO_COARSE, COARSE_BLOCKS, seed=0)
    x = torch.cat([x for x, _ in planted_batches(seed=1)])
    with torch.no_grad():
        before = model(x)
    kept = _logits_after(model, scored)
    inverted = _logits_after(model, [LayerScores(s.layer, s.level, -s.scores) for s in scored])
    scale = float(before.abs().max())
    assert float((kept - before).abs().max()) <= 1e-4 * scale
    assert float((inverted - before).abs().max()) > 0.1 * scale
    assert torch.equal(kept.argmax(1), before.argmax(1))
