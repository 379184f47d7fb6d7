"""Where this project meets the authors' released code, pinned (docs/method.md, "Departures from the
released code"): the coarse/fine boundary over blocks, the released distillation loss, the uniform
budget's rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from cdc.io import load_model
from cdc.models import build_model
from cdc.params import Params
from cdc.pruning import keep_counts
from cdc.scoring import score_layers
from cdc.stats import LayerStats
from cdc.train import kd_loss
from tests.workspace import run_ok


def released_levels(n_blocks: int, t: int) -> list[str]:
    """The released code: block b (0-based over all stages) is scored against coarse labels if b <= T."""
    return ["coarse" if b <= t else "fine" for b in range(n_blocks)]


def levels_by_block(arch: str, coarse_blocks: int) -> dict[str, set[str]]:
    """The label level of every layer of `arch`, gathered per block, as `score` assigns them."""
    model = build_model(arch, 10, 3)
    rng = np.random.default_rng(0)
    stats = {
        layer.name: LayerStats(np.full(10, 8), 4, rng.random((10, 3)) * 40, rng.random((10, 3)) * 400 + 400)
        for layer in model.prunable_layers()
    }
    block_of = {layer.name: layer.block for layer in model.prunable_layers()}
    scored = score_layers(stats, "fisher", np.arange(10) % 3, coarse_blocks, seed=0, block_of=block_of)
    out: dict[str, set[str]] = {}
    for layer in scored:
        out.setdefault(block_of[layer.layer], set()).add(layer.level)
    return out


def test_resnet56_with_the_released_t_scores_blocks_0_to_14_coarse():
    by_block = levels_by_block("resnet56", coarse_blocks=15)  # the released T = 14, 0-based
    assert len(by_block) == 27
    assert [level for levels in by_block.values() for level in levels] == released_levels(27, 14)


def test_every_layer_of_a_resnet50_bottleneck_shares_its_labels():
    model = build_model("resnet50", 10, 3)
    blocks = model.layer_blocks()
    assert len(model.prunable_layers()) == 32 and len(blocks) == 16
    assert blocks["layer3.1"] == ["layer3.1.conv1", "layer3.1.conv2"]
    for t in (8, 9):  # around round(0.52 x 16); the layer count (17 of 32) once split layer3.1
        by_block = levels_by_block("resnet50", coarse_blocks=t)
        assert all(len(levels) == 1 for levels in by_block.values())
        assert [levels.pop() for levels in by_block.values()] == released_levels(16, t - 1)


def test_coarse_blocks_is_checked_against_the_blocks_not_the_layers():
    Params.model_validate({"train_teacher": {"arch": "resnet50"}, "score": {"coarse_blocks": 16}})
    with pytest.raises(ValueError, match="16, the blocks of resnet50"):
        Params.model_validate({"train_teacher": {"arch": "resnet50"}, "score": {"coarse_blocks": 17}})


def test_temperature_1_is_the_released_distillation_loss():
    """Released: cross-entropy to the teacher's softmax at temperature 1, no T^2. `distill.temperature: 1`
    gives the same gradient; the losses differ by the teacher's entropy (written out in float64)."""
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(16, 10, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(16, 10, generator=gen, dtype=torch.float64) * 3
    ours = kd_loss(student, teacher, temperature=1.0)
    (grad_ours,) = torch.autograd.grad(ours, student)
    s, t = student.detach().numpy(), teacher.numpy()
    p_t = np.exp(t - t.max(1, keepdims=True))
    p_t /= p_t.sum(1, keepdims=True)
    log_p_s = s - s.max(1, keepdims=True) - np.log(np.exp(s - s.max(1, keepdims=True)).sum(1, keepdims=True))
    released = -(p_t * log_p_s).sum(1).mean()
    entropy = -(p_t * np.log(p_t)).sum(1).mean()
    assert float(ours.detach()) == pytest.approx(released - entropy, rel=1e-12)
    released_grad = (np.exp(log_p_s) - p_t) / len(s)  # d/ds of the mean cross-entropy
    np.testing.assert_allclose(grad_ours.numpy(), released_grad, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize(
    ("width", "ratio", "removed", "released_removed"),
    [(64, 0.45, 29, 28), (16, 0.3, 5, 4), (32, 0.5, 16, 16), (10, 0.25, 2, 2), (64, 0.7, 45, 44)],
)
def test_the_uniform_budget_rounds_where_the_released_code_floors(width, ratio, removed, released_removed):
    assert int(np.floor(ratio * width)) == released_removed
    assert keep_counts("uniform", ["l"], [width], {"ratio": ratio}) == [width - removed]


@pytest.mark.e2e
def test_dca_on_the_pruned_inner_activation_as_released(repro_copy):
    """`fit_dca.layer: layer1.2.relu1` (ResNet-56's Res16_2 in the released code; here ResNet-20's):
    teacher and student each get a basis of their own width, and distillation runs on them."""
    ws, env = repro_copy
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["fit_dca"]["layer"] = "layer1.2.relu1"
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    run_ok(["cdc", "fit_dca"], ws, env)
    with np.load(ws / "data/dca/dca.npz") as dca:
        w_teacher, w_student = dca["w_teacher"], dca["w_student"]
    pool = params["fit_dca"]["pool"]
    kept = load_model(ws / "data/prune/model.pt")[0].get_submodule("layer1.2.conv1").out_channels
    assert kept < 16  # pruned: the released setting distils across two widths
    assert w_teacher.shape[0] == 16 * pool * pool and w_student.shape[0] == kept * pool * pool
    assert w_teacher.shape[1] == w_student.shape[1]  # the same L components
    run_ok(["cdc", "distill"], ws, env)
    assert (ws / "data/student/model.pt").exists()
