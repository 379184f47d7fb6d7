"""Hook statistics and discriminant functions against independent float64 references.

The references never touch the sufficient-statistics code: they keep the raw activations of every
image and compute means and variances with numpy over explicit pixel vectors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cdc.discriminants import DISCRIMINANTS
from cdc.models import build_model
from cdc.stats import LayerStats, collect_stats
from cdc.stats_table import read_stats, write_stats
from tests.conftest import batches


@pytest.fixture(scope="module")
def model_and_raw(small_split):
    """A ResNet-20 with perturbed BN (so activations are not trivial) and its raw scored activations."""
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 1).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    raw: dict[str, list[np.ndarray]] = {}
    handles = [
        layer.activation.register_forward_hook(
            lambda _m, _i, out, name=layer.name: raw.setdefault(name, []).append(out.double().numpy().copy())
        )
        for layer in model.prunable_layers()
    ]
    labels = []
    with torch.no_grad():
        for x, y in batches(small_split, 50):
            model(x)
            labels.append(y.numpy())
    for h in handles:
        h.remove()
    return model, {k: np.concatenate(v) for k, v in raw.items()}, np.concatenate(labels)


def test_hook_statistics_equal_direct_sums(model_and_raw, small_split):
    model, raw, labels = model_and_raw
    stats = collect_stats(
        model, batches(small_split, 37), 10
    )  # another batch size: streaming must not matter
    assert list(stats) == [layer.name for layer in model.prunable_layers()]
    for name, acts in raw.items():
        st = stats[name]
        assert st.pixels == acts.shape[2] * acts.shape[3]
        for k in range(10):
            a = acts[labels == k].astype(np.float64)
            assert st.n[k] == len(a)
            # per-image pixel sums are float32 (cdc.stats): worst case P * 2**-24 relative, P = 784 pixels
            np.testing.assert_allclose(st.s1[k], a.sum(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(st.s2[k], (a**2).sum(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)


def _reference_scores(name: str, acts: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per channel: one-vs-rest over classes with pixels pooled, mean over classes, plain numpy."""
    eps = {"symdiv": 0.05, "ttest": 1e-4, "fisher": 1e-4, "snr": 1e-4}[name]
    channels = acts.shape[1]
    out = np.zeros(channels)
    for c in range(channels):
        per_class = []
        for k in np.unique(labels):
            p = acts[labels == k, c].ravel()
            q = acts[labels != k, c].ravel()
            mp, mq, vp, vq = p.mean(), q.mean(), p.var(), q.var()
            if name == "symdiv":
                s = 0.5 * (vp / (vq + eps) + vq / (vp + eps)) + 0.5 * (mp - mq) ** 2 / (vp + vq + eps) - 1
            elif name == "ttest":
                n_p, n_q = (labels == k).sum(), (labels != k).sum()
                s = abs(mp - mq) / np.sqrt(vp / n_p + vq / n_q + eps)
            elif name == "fisher":
                s = (mp - mq) ** 2 / (vp + vq + eps)
            else:
                s = abs(mp - mq) / (np.sqrt(vp) + np.sqrt(vq) + eps)
            per_class.append(s)
        out[c] = np.mean(per_class)
    return out


def _exact_stats(acts: np.ndarray, labels: np.ndarray, n_classes: int) -> LayerStats:
    """Sufficient statistics straight from captured activations, every sum in float64."""
    a = acts.astype(np.float64)
    onehot = np.eye(n_classes)[labels]  # images x classes
    return LayerStats(
        onehot.sum(0).astype(np.int64),
        a.shape[2] * a.shape[3],
        onehot.T @ a.sum(axis=(2, 3)),
        onehot.T @ (a**2).sum(axis=(2, 3)),
    )


@pytest.mark.parametrize("name", ["symdiv", "ttest", "fisher", "snr"])
@pytest.mark.parametrize("coarse", [False, True])
def test_discriminant_matches_reference(model_and_raw, name, coarse):
    """The discriminant math against a per-channel numpy reference, on exact float64 statistics."""
    _, raw, labels = model_and_raw
    fine_to_coarse = np.array([0, 1, 0, 0, 0, 2, 0, 2, 1, 2])
    for layer in ["layer1.0", "layer2.1", "layer3.2"]:
        st, lab = _exact_stats(raw[layer], labels, 10), labels
        if coarse:
            st, lab = st.grouped(fine_to_coarse, 3), fine_to_coarse[labels]
        got = DISCRIMINANTS.get(name)(st, np.random.default_rng(0))
        want = _reference_scores(name, raw[layer], lab)
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", ["symdiv", "ttest", "fisher", "snr"])
def test_collected_statistics_rank_channels_as_exact_ones(model_and_raw, small_split, name):
    """Float32 per-image partial sums (cdc.stats) move scores by ~1e-5 relative at most and change
    no channel's rank."""
    model, raw, labels = model_and_raw
    stats = collect_stats(model, batches(small_split, 64), 10)
    for layer in ["layer1.0", "layer2.1", "layer3.2"]:
        got = DISCRIMINANTS.get(name)(stats[layer], np.random.default_rng(0))
        want = DISCRIMINANTS.get(name)(_exact_stats(raw[layer], labels, 10), np.random.default_rng(0))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-8)
        assert np.array_equal(np.argsort(got, kind="stable"), np.argsort(want, kind="stable"))


def test_random_scores_are_seeded(model_and_raw, small_split):
    model, _, _ = model_and_raw
    st = collect_stats(model, batches(small_split, 64), 10)["layer1.0"]
    a = DISCRIMINANTS["random"](st, np.random.default_rng(7))
    b = DISCRIMINANTS["random"](st, np.random.default_rng(7))
    assert a.shape == (16,) and np.array_equal(a, b)


def test_absent_class_is_ignored(model_and_raw, small_split):
    """A class with no images (tiny subsets, empty coarse groups) must not produce NaNs."""
    model, _, _ = model_and_raw
    st = collect_stats(model, batches(small_split, 64), 10)["layer2.0"]
    st.n[3], st.s1[3], st.s2[3] = 0, 0.0, 0.0
    for name in ("symdiv", "ttest", "fisher", "snr"):
        assert np.isfinite(DISCRIMINANTS.get(name)(st, np.random.default_rng(0))).all()


def test_parquet_round_trip(model_and_raw, small_split, tmp_path):
    model, _, _ = model_and_raw
    stats = collect_stats(model, batches(small_split, 64), 10)
    write_stats(tmp_path / "s.parquet", stats)
    back = read_stats(tmp_path / "s.parquet")
    assert list(back) == list(stats)
    for name in stats:
        assert back[name].pixels == stats[name].pixels
        np.testing.assert_array_equal(back[name].n, stats[name].n)
        np.testing.assert_array_equal(back[name].s1, stats[name].s1)
        np.testing.assert_array_equal(back[name].s2, stats[name].s2)
