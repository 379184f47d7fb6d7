"""Scoring criteria and the FLOPs-targeting budgets, pinned against independent references."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.linalg
import torch
import yaml

from cdc.criteria import CRITERIA, taylor_scores, weight_scores
from cdc.data import Split
from cdc.discriminants import di, symdiv
from cdc.flops import count_macs
from cdc.models import build_model
from cdc.pruning import BudgetProbe, keep_counts, silencing_probe
from cdc.scoring import score_layers
from cdc.stats import GridStats, collect_all_stats
from cdc.stats_table import read_grid_stats, write_grid_stats
from components.cli import main
from tests.conftest import batches

SHAPE = (1, 28, 28)


def _di_reference(x: np.ndarray, y: np.ndarray, rho: float) -> float:
    """DI of one channel from its raw G-vectors (N x G): scatter from centred data, not from sums."""
    centred = x - x.mean(0)
    total = centred.T @ centred
    between = np.zeros_like(total)
    for k in np.unique(y):
        d = (x[y == k].mean(0) - x.mean(0))[:, None]
        between += (y == k).sum() * (d @ d.T)
    return float(np.trace(scipy.linalg.solve(total + rho * np.eye(len(total)), between, assume_a="sym")))


def _grid_from_raw(x: np.ndarray, y: np.ndarray, classes: int) -> GridStats:
    """Grid statistics of raw N x C x G vectors (float64)."""
    n = np.bincount(y, minlength=classes)
    s1 = np.stack([x[y == k].sum(0) for k in range(classes)])
    outer = np.einsum("ncg,nch->cgh", x, x)
    return GridStats(n, s1, outer)


def test_di_matches_an_independent_float64_reference(rng):
    n, c, g, classes = 400, 5, 16, 4
    y = rng.integers(0, classes, n)
    x = rng.normal(size=(n, c, g)) + 0.5 * y[:, None, None] * rng.normal(size=(1, c, g))
    x[:, 3] = 0.0  # a dead channel scores 0, not NaN
    scores = di(_grid_from_raw(x, y, classes), rng)
    expected = [_di_reference(x[:, ch], y, 1e-4) for ch in range(c)]
    np.testing.assert_allclose(scores, expected, rtol=1e-8, atol=1e-12)
    assert scores[3] == 0.0
    # coarse statistics are sums of fine ones: DI of grouped stats = DI with merged labels
    merge = np.array([0, 0, 1, 1])
    grouped = di(_grid_from_raw(x, y, classes).grouped(merge, 2), rng)
    expected = [_di_reference(x[:, ch], merge[y], 1e-4) for ch in range(c)]
    np.testing.assert_allclose(grouped, expected, rtol=1e-8)


def test_grid_statistics_of_a_pass_equal_pooling_by_hand(small_split, tmp_path: Path):
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 1).eval()
    data = batches(small_split, 100)
    _, grid = collect_all_stats(model, data, 10, grid=4)
    layer = model.prunable_layers()[4]  # layer2.1: 14x14 maps -> 4x4 adaptive cells
    maps, labels = [], []
    handle = layer.activation.register_forward_hook(lambda _m, _i, out: maps.append(out.detach().clone()))
    with torch.no_grad():
        for x, yb in data:
            model(x)
            labels.append(yb)
    handle.remove()
    pooled = torch.nn.functional.adaptive_avg_pool2d(torch.cat(maps), 4).flatten(2).double().numpy()
    y = torch.cat(labels).numpy()
    expected = _grid_from_raw(pooled, y, 10)
    got = grid[layer.name]
    np.testing.assert_array_equal(got.n, expected.n)
    np.testing.assert_allclose(got.s1, expected.s1, rtol=1e-9)
    np.testing.assert_allclose(got.outer, expected.outer, rtol=1e-9)
    write_grid_stats(tmp_path / "grid.parquet", grid)
    back = read_grid_stats(tmp_path / "grid.parquet")
    assert list(back) == list(grid)
    for name in grid:
        np.testing.assert_array_equal(back[name].s1, grid[name].s1)
        np.testing.assert_array_equal(back[name].outer, grid[name].outer)
        np.testing.assert_array_equal(back[name].n, grid[name].n)


def test_pre_relu_and_batch_mode_statistics(small_split):
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 1).eval()
    data = batches(small_split, 100)
    layer = model.prunable_layers()[0]
    outs: list[torch.Tensor] = []
    handle = layer.norm.register_forward_hook(lambda _m, _i, out: outs.append(out.detach().clone()))
    with torch.no_grad():
        for x, _ in data:
            model(x)
    handle.remove()
    pre = collect_all_stats(model, data, 10, tensor="pre_relu")[0][layer.name]
    assert pre.s1.sum() == pytest.approx(torch.cat(outs).double().sum().item(), rel=1e-6)
    assert (pre.s1 < 0).any()  # before the ReLU: negative sums exist
    state = copy.deepcopy(model.state_dict())
    batch = collect_all_stats(model, data, 10, bn_mode="batch")[0][layer.name]
    post = collect_all_stats(model, data, 10)[0][layer.name]
    assert not np.allclose(batch.s1, post.s1)  # batch statistics normalize differently
    for k, v in model.state_dict().items():  # ...on a copy: the model's running stats are untouched
        torch.testing.assert_close(v, state[k])


def test_eps_replaces_the_ridge(rng):
    from cdc.stats import LayerStats

    st = LayerStats(np.array([5, 7, 6]), 4, rng.random((3, 6)) * 20, rng.random((3, 6)) * 100 + 200)
    default = score_layers({"l": st}, "symdiv", np.array([0, 1, 1]), 0, 0)[0].scores
    ridge = score_layers({"l": st}, "symdiv", np.array([0, 1, 1]), 0, 0, eps=1.0)[0].scores
    np.testing.assert_allclose(default, symdiv(st, rng))
    np.testing.assert_allclose(ridge, symdiv(st, rng, eps=1.0))
    assert not np.allclose(default, ridge)


def test_weight_criteria_match_the_weights():
    torch.manual_seed(0)
    model = build_model("vgg_small", 10, 1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.normal_(m.weight)
    l1 = weight_scores("l1", model, SHAPE)
    gamma = weight_scores("bn_gamma", model, SHAPE)
    for layer in model.prunable_layers():
        w = layer.conv.weight.detach().double().numpy()
        np.testing.assert_allclose(l1[layer.name], np.abs(w).reshape(len(w), -1).sum(1), rtol=1e-6)
        np.testing.assert_allclose(gamma[layer.name], np.abs(layer.norm.weight.detach().double().numpy()))
    for name in ("tp_magnitude", "tp_fpgm"):
        scores = weight_scores(name, model, SHAPE)
        assert [len(v) for v in scores.values()] == model.prunable_widths()
        assert all(np.isfinite(v).all() for v in scores.values())


def test_taylor_equals_the_gradient_of_a_channel_gate(small_split):
    """Independent form: gate each channel of each image by g = 1; |dL/dg| = |sum_hw a * dL/da|."""
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 1).eval()
    data = batches(small_split, 100)
    got = taylor_scores(model, data, max_batches=2)
    layers = model.prunable_layers()
    totals = {layer.name: 0.0 for layer in layers}
    for i, (x, y) in enumerate(data):
        if i == 2:
            break
        gates: dict[str, torch.Tensor] = {}

        def gate(name, gates=gates):
            def hook(_m, _i, out):
                gates[name] = torch.ones(out.shape[0], out.shape[1], 1, 1, requires_grad=True)
                return out * gates[name]

            return hook

        handles = [layer.activation.register_forward_hook(gate(layer.name)) for layer in layers]
        loss = torch.nn.functional.cross_entropy(model(x), y, reduction="sum")
        grads = torch.autograd.grad(loss, [gates[layer.name] for layer in layers])
        for h in handles:
            h.remove()
        for layer, grad in zip(layers, grads, strict=True):
            totals[layer.name] = totals[layer.name] + grad.abs().sum((0, 2, 3)).double().numpy()
    for layer in layers:
        np.testing.assert_allclose(got[layer.name], totals[layer.name] / 200, rtol=1e-5, atol=1e-9)


def _flops_fn(arch: str):
    cache: dict[tuple[int, ...], int] = {}

    def flops(widths: list[int]) -> int:
        key = tuple(widths)
        if key not in cache:
            cache[key] = count_macs(build_model(arch, 10, 1, list(widths)), SHAPE)
        return cache[key]

    return flops


@pytest.mark.parametrize("round_to", [1, 8])
def test_flops_target_meets_its_target_and_spares_the_sensitive_layer(round_to):
    model = build_model("resnet20", 10, 1)
    names, widths = [layer.name for layer in model.prunable_layers()], model.prunable_widths()
    flops = _flops_fn("resnet20")
    # accuracy falls steeply with cuts of layer 0 only: the budget must take its FLOPs elsewhere
    probe = BudgetProbe(flops, [], accuracy=lambda keep: 0.9 - 0.05 * (widths[0] - keep[0]))
    params = {"flops_target": 0.6, "sensitivity_step": 0.02, "round_to": round_to}
    keep = keep_counts("flops_target", names, widths, params, probe)
    ratio = flops(keep) / flops(widths)
    assert 0.59 <= ratio <= 0.6
    assert keep[0] == widths[0]
    assert all(k % round_to == 0 for k in keep)
    assert probe.trace and probe.trace[-1]["flops_ratio"] == pytest.approx(ratio)


def test_flops_target_with_the_silencing_probe_on_a_real_model(small_split):
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 1)
    names, widths = [layer.name for layer in model.prunable_layers()], model.prunable_widths()
    scores = [np.random.default_rng(i).random(w) for i, w in enumerate(widths)]
    images = Split(small_split.images[:50], small_split.labels[:50])  # the probe runs them per cut tried
    probe = silencing_probe(model, scores, batches(images, 25), _flops_fn("resnet20"))
    # silencing every channel but the best-scored ones is pruning: the probe's accuracy of a cut
    # equals the physically pruned model's
    keep = keep_counts("flops_target", names, widths, {"flops_target": 0.7, "sensitivity_step": 0.05}, probe)
    ratio = probe.flops(keep) / probe.flops(widths)
    assert 0.69 <= ratio <= 0.7
    from cdc.pruning import channels_to_remove, prune_channels

    pruned = prune_channels(
        copy.deepcopy(model),
        {n: channels_to_remove(s, k) for n, s, k in zip(names, scores, keep, strict=True)},
        SHAPE,
    ).eval()
    correct = sum(int((pruned(x).argmax(1) == y).sum()) for x, y in batches(images, 25))
    assert probe.accuracy(keep) == pytest.approx(correct / 50)


def test_global_budget_meets_the_target_from_the_lowest_scores():
    model = build_model("resnet20", 10, 1)
    names, widths = [layer.name for layer in model.prunable_layers()], model.prunable_widths()
    flops = _flops_fn("resnet20")
    scores = [np.random.default_rng(i).random(w) for i, w in enumerate(widths)]
    scores[0] = np.full(widths[0], 10.0)
    keep = keep_counts("global", names, widths, {"flops_target": 0.5}, BudgetProbe(flops, scores))
    ratio = flops(keep) / flops(widths)
    assert 0.49 <= ratio <= 0.5
    assert keep[0] == widths[0]  # the layer with the highest scores loses nothing


def test_every_criterion_scores_through_the_score_stage(repro_copy, monkeypatch):
    ws, _ = repro_copy
    monkeypatch.chdir(ws)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{ws / 'criteria.db'}")
    monkeypatch.delenv("CDC_PARENT_RUN_ID", raising=False)
    params = yaml.safe_load(Path("params.yaml").read_text())
    widths = None
    for name, criterion in sorted(CRITERIA.items()):
        for hierarchy in (True, False) if criterion.class_discriminant else (True,):
            params["score"].update(criterion=name, hierarchy=hierarchy)
            Path("criterion.yaml").write_text(yaml.safe_dump(params))
            out = Path(f"criteria/{name}-{hierarchy}")
            args = ["score", "--params", "criterion.yaml"]
            assert main([*args, "--scores", str(out / "s.parquet"), "--groups", str(out / "g.json")]) == 0
            table = pq.read_table(out / "s.parquet").to_pandas()
            assert np.isfinite(table["score"]).all(), name
            counts = table.groupby("layer_index").size().tolist()
            widths = widths or counts
            assert counts == widths
            levels = set(table["label_level"])
            if not criterion.class_discriminant:
                assert levels == {"none"} if name != "random" else levels == {"coarse", "fine"}
            elif hierarchy:
                assert levels == {"coarse", "fine"}
            else:
                assert levels == {"fine"}
