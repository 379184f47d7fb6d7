"""The discriminant scores rank channels the right way round: a guard on a small real run.

A ResNet-20 teacher is trained briefly on 10,000 Fashion-MNIST images; its channels are scored with
hierarchical `symdiv`, it is pruned with the default uniform ratio, BN is recalibrated and the pruned
network (no fine-tuning) is evaluated on 2,000 held-out images. The guards: keeping the channels symdiv
ranks highest beats keeping those it ranks lowest by 10 points (a sign or ranking bug lands far below),
and at 70% fewer FLOPs it beats the mean of three random draws by 5 points.

Measured (2026-11-30, two 2-core CPU machines of the same kind; the same code trains different
weights on each): teacher 85.2% / 83.5%; symdiv 66.6% / 52.0%; inverted ranking 26.4% / 33.2%;
random channels, mean of six seeds, 62.6% / 57.9%. On the second machine symdiv fell *below* the
random mean at both ratios tried (0.30 and 0.53) and for a second teacher seed too, so "beats random"
is asserted only where the comparison (`cdc compare`, docs/results.md) found it on every teacher: at
the largest cut (70% fewer FLOPs), where symdiv led random by 25 points on average.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from cdc.data import Split, stratified_split, stratified_subset
from cdc.hierarchy import coarse_block_count, coarse_groups
from cdc.models import build_model
from cdc.params import PruneParams, ScoreParams
from cdc.pruning import channels_to_remove, keep_counts, prune_channels
from cdc.scoring import LayerScores, score_layers
from cdc.stats import collect_stats, confusion_matrix
from cdc.train import evaluate, recalibrate_bn, sgd, train_one_epoch, warmup_cosine
from tests.conftest import batches

SHAPE = (1, 28, 28)


@pytest.fixture(scope="module")
def small_run(fmnist):
    train_all, _ = fmnist
    idx = stratified_subset(train_all.labels, 12000, seed=0)
    fit_idx, val_idx = stratified_split(train_all.labels[idx], 2000 / 12000, seed=0)
    train = Split(train_all.images[idx][fit_idx], train_all.labels[idx][fit_idx])
    val = Split(train_all.images[idx][val_idx], train_all.labels[idx][val_idx])
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 1)
    epochs, loader = 3, batches(train, 128, shuffle=True, augment=True, seed=0)
    optimizer = sgd(model, 0.1, 0.9, 5e-4)
    scheduler = warmup_cosine(optimizer, epochs * len(loader), len(loader) // 2)
    for _ in range(epochs):
        train_one_epoch(model, loader, optimizer, scheduler)
    stats = collect_stats(model, batches(train, 256), 10)
    confusion = confusion_matrix(model, batches(val, 256), 10)
    return model, train, val, stats, confusion


def _pruned_accuracy(model, train, val, scored: list[LayerScores], ratio: float | None = None) -> float:
    pruned = copy.deepcopy(model)
    names = [layer.name for layer in pruned.prunable_layers()]
    params = PruneParams().model_dump() | ({"ratio": ratio} if ratio is not None else {})
    keep = keep_counts("uniform", names, pruned.widths(), params)
    prune_channels(
        pruned, {s.layer: channels_to_remove(s.scores, k) for s, k in zip(scored, keep, strict=True)}, SHAPE
    )
    recalibrate_bn(pruned, batches(train, 128, shuffle=True, seed=0), 20)
    return evaluate(pruned, batches(val, 256)).accuracy


def test_symdiv_keeps_better_channels_than_its_inverted_ranking(small_run):
    model, train, val, stats, confusion = small_run
    teacher = evaluate(model, batches(val, 256)).accuracy
    assert teacher > 0.8, "the teacher did not train"
    defaults = ScoreParams()
    groups = coarse_groups(confusion, defaults.n_coarse, seed=0)
    t = coarse_block_count(len(stats), defaults.coarse_blocks, defaults.coarse_fraction)
    scored = score_layers(stats, "symdiv", groups, t, seed=0)
    symdiv = _pruned_accuracy(model, train, val, scored)
    inverted = _pruned_accuracy(model, train, val, [LayerScores(s.layer, s.level, -s.scores) for s in scored])
    assert symdiv > inverted + 0.10, (symdiv, inverted)


# 70% fewer FLOPs: where the comparison (docs/results.md) found hierarchical symdiv ahead of random
# channels on all three teachers, by 25 points on average right after pruning.
LARGE_CUT = 0.7
MARGIN = 0.05  # points of validation accuracy over the mean of the random draws


def test_symdiv_beats_random_channels_at_a_large_cut(small_run):
    from pipeline.compare import uniform_ratio_for

    model, train, val, stats, confusion = small_run
    defaults = ScoreParams()
    groups = coarse_groups(confusion, defaults.n_coarse, seed=0)
    t = coarse_block_count(len(stats), defaults.coarse_blocks, defaults.coarse_fraction)
    ratio = uniform_ratio_for("resnet20", 10, SHAPE, LARGE_CUT)
    symdiv = _pruned_accuracy(model, train, val, score_layers(stats, "symdiv", groups, t, seed=0), ratio)
    draws = [
        _pruned_accuracy(model, train, val, score_layers(stats, "random", groups, t, seed=s), ratio)
        for s in range(3)
    ]
    assert symdiv > np.mean(draws) + MARGIN, (symdiv, draws)
