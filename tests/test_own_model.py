"""Models nobody here wrote (torchvision's and timm's builders, random init, no download): discovery of
their prunable layers, physical pruning of half of every prunable group, FLOPs against an independent
count, a reload in a fresh process from the factory and the saved widths alone, and the statistics
hooks on the tensor that follows each conv."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cdc.criteria import CRITERIA, taylor_scores, weight_scores
from cdc.discovery import (
    ACTIVATION,
    CONV_OUTPUT,
    NORM_OUTPUT,
    NORM_WITH_ACTIVATION,
    OPTIONAL,
    PRUNABLE,
    RESIDUAL,
    discover,
)
from cdc.errors import InputError
from cdc.flops import count_macs, count_macs_of
from cdc.inference import export_onnx
from cdc.io import atomic_path, load_model, save_model
from cdc.models import Imported, build_model, hook_layer
from cdc.params import PruneParams, model_layout, validate_params
from cdc.pruning import BudgetProbe, keep_counts, prune_channels, silencing_probe
from cdc.scoring import score_layers
from cdc.stats import collect_all_stats
from components.stages.export import exporting
from tests.workspace import run_here

FOREIGN = [
    "torchvision.models:resnet18",
    "torchvision.models:resnet50",
    "torchvision.models:mobilenet_v2",
    "torchvision.models:mobilenet_v3_small",
    "torchvision.models:efficientnet_b0",
    "torchvision.models:regnet_x_400mf",
    "torchvision.models:vgg11_bn",
    "timm.models.resnet:resnet18",
    "timm.models.efficientnet:efficientnet_b0",
    "timm.models.mobilenetv3:mobilenetv3_small_100",
]
SHAPE = (3, 32, 32)
IMPORTED = Imported(image_size=SHAPE[1:])
WHOLE = {RESIDUAL, "concatenation", "grouped conv", "reused conv", *OPTIONAL}


def independent_macs(model: nn.Module, shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of the convs and linears, from the shapes each one sees (not torch's counter)."""
    total = [0]

    def conv(m: nn.Conv2d, _i: tuple, out: torch.Tensor) -> None:
        kh, kw = m.kernel_size
        total[0] += out[0].numel() * (m.in_channels // m.groups) * kh * kw

    def linear(m: nn.Linear, _i: tuple, out: torch.Tensor) -> None:
        total[0] += out[0].numel() * m.in_features

    handles = [
        m.register_forward_hook(conv if isinstance(m, nn.Conv2d) else linear)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    with torch.no_grad():
        model.eval()(torch.zeros(1, *shape))
    for h in handles:
        h.remove()
    return total[0]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Every foreign model with half of each prunable group's channels removed (random ones, so that the
    reload cannot pass by keeping the first channels), saved, then reloaded in one fresh process."""
    folder = tmp_path_factory.mktemp("foreign")
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    out = {}
    for i, arch in enumerate(FOREIGN):
        torch.manual_seed(i)
        model = build_model(arch, 10, 3, imported=IMPORTED)
        full = model.prunable_widths()
        rng = np.random.default_rng(i)
        removals = {
            layer.name: sorted(
                rng.choice(layer.conv.out_channels, layer.conv.out_channels // 2, replace=False)
            )
            for layer in model.prunable_layers()
        }
        prune_channels(model, {k: [int(c) for c in v] for k, v in removals.items()}, SHAPE)
        path = folder / f"{i}.pt"
        save_model(path, model, arch, 10, 3)
        with torch.no_grad():
            logits = model.eval()(x).numpy()
        out[arch] = {"model": model, "full": full, "path": path, "logits": logits}
    torch.save(x, folder / "x.pt")
    script = (
        "import json, sys, torch\n"
        "from cdc.io import load_model\n"
        f"x = torch.load({str(folder / 'x.pt')!r}, weights_only=True)\n"
        "out = {}\n"
        "for path in sys.argv[1:]:\n"
        "    model, record = load_model(path)\n"
        "    with torch.no_grad():\n"
        "        out[path] = {'logits': model(x).tolist(), 'widths': model.prunable_widths()}\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, *(str(v["path"]) for v in out.values())],
        capture_output=True,
        text=True,
        cwd=folder,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    reloaded = json.loads(proc.stdout.strip().splitlines()[-1])
    for v in out.values():
        v["reloaded"] = reloaded[str(v["path"])]
    return out


@pytest.mark.parametrize("arch", FOREIGN)
def test_a_foreign_model_is_discovered_pruned_counted_and_reloaded(arch: str, pruned: dict[str, dict]):
    entry = pruned[arch]
    model = entry["model"]
    found = model.discovered()
    assert found and all(d.status in {PRUNABLE, *WHOLE} for d in found), [d.status for d in found]
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    followers = {f for d in found for f in d.followers}
    # every conv is listed once, as itself or as following another's channels
    assert sorted([d.name for d in found] + sorted(followers)) == sorted(convs)
    prunable = [d for d in found if d.status == PRUNABLE]
    assert [layer.name for layer in model.prunable_layers()] == [d.name for d in prunable]
    assert model.prunable_widths() == [w - w // 2 for w in entry["full"]]
    with torch.no_grad():
        out = model.eval()(torch.randn(2, *SHAPE))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert count_macs(model, SHAPE) == independent_macs(model, SHAPE)
    assert entry["reloaded"]["widths"] == model.prunable_widths()
    np.testing.assert_allclose(np.array(entry["reloaded"]["logits"]), entry["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", FOREIGN)
def test_the_hooks_see_the_tensor_that_follows_each_prunable_conv(arch: str, pruned: dict[str, dict]):
    """What the statistics hook on each layer is its conv's output through the BN and the activation the
    discovery names (module, inside the BN, or functional), recomputed here from the conv's output."""
    model = pruned[arch]["model"].eval()
    layers = model.prunable_layers()
    kinds = {d.name: d for d in model.discovered()}
    seen: dict[str, torch.Tensor] = {}
    conv_out: dict[str, torch.Tensor] = {}
    handles = [
        hook_layer(model, layer, lambda t, n=layer.name: seen.__setitem__(n, t.clone())) for layer in layers
    ]
    handles += [
        layer.conv.register_forward_hook(lambda _m, _i, o, n=layer.name: conv_out.__setitem__(n, o.clone()))
        for layer in layers
    ]
    with torch.no_grad():
        model(torch.randn(2, *SHAPE))
        for h in handles:
            h.remove()
        for layer in layers:
            d = kinds[layer.name]
            x = conv_out[layer.name]
            if d.hooked == CONV_OUTPUT:
                expected = x
            else:
                normed = layer.norm(x) if layer.norm is not None else x
                if d.hooked in (NORM_OUTPUT, NORM_WITH_ACTIVATION):
                    expected = normed
                elif d.hooked == ACTIVATION:
                    expected = layer.activation(normed.clone())
                else:
                    expected = getattr(nn.functional, d.function)(normed)
            assert seen[layer.name].shape[1] == layer.conv.out_channels
            torch.testing.assert_close(seen[layer.name], expected, rtol=1e-5, atol=1e-5)
    assert set(seen) == {layer.name for layer in layers}


@pytest.mark.parametrize("arch", ["resnet20", "resnet56", "resnet18", "resnet50"])
def test_discovery_finds_the_declared_layers_and_blocks_of_the_registered_resnets(arch: str):
    """The same definition on the zoo's ResNets: the inner convs are prunable, the rest share the residual
    stream; each layer's scored tensor and block are those the classes declare (method §3's blocks)."""
    model = build_model(arch, 10, 3)
    found = [d for d in discover(model, torch.zeros(1, 3, 32, 32)) if d.status == PRUNABLE]
    declared = [(conv, act, model._block_of.get(name, name)) for name, conv, _, act in model._prunable]
    assert [(d.name, d.tensor, d.block) for d in found] == declared


def test_layer_patterns_include_the_stem_and_exclude_by_name():
    net = Imported(image_size=(32, 32), include=["features.0.0", "features.[23].*"], exclude=["*.fc1"])
    model = build_model("torchvision.models:mobilenet_v3_small", 10, 3, imported=net)
    names = [layer.name for layer in model.prunable_layers()]
    assert names == ["features.0.0", "features.2.block.0.0", "features.3.block.0.0"]
    statuses = {d.name: d.status for d in model.discovered()}
    assert statuses["features.4.block.0.0"] == "not included"
    assert statuses["features.2.block.2.0"] == RESIDUAL  # no pattern prunes a residual stream


def test_a_model_that_does_not_fit_the_dataset_is_refused_with_the_reason():
    with pytest.raises(InputError, match="does not run on 1x28x28 images"):
        build_model("torchvision.models:resnet18", 10, 1, imported=Imported(image_size=(28, 28)))
    with pytest.raises(InputError, match="outputs of shape"):
        build_model(
            "torchvision.models:resnet18", 10, 3, imported=Imported({"num_classes": 7}, image_size=(32, 32))
        )
    with pytest.raises(InputError, match="cannot import"):
        build_model("nowhere.at_all:build", 10, 3)
    with pytest.raises(InputError, match="has no"):
        build_model("torchvision.models:no_such_model", 10, 3)


def test_cdc_inspect_prints_the_discovered_layers(tmp_path: Path):
    proc = run_here(["inspect", "torchvision.models:efficientnet_b0"], tmp_path, {"PATH": ""})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "torchvision.models:efficientnet_b0 on 3x224x224 images, 1000 classes"
    assert any(line.startswith("features.2.0.block.0.0") and " prunable " in line for line in lines)
    assert any(line.startswith("features.0.0") and "stem" in line for line in lines)
    assert "33 prunable of 49 channel groups (81 convs)" in proc.stdout


def test_a_reloaded_model_file_keeps_the_layer_patterns(tmp_path: Path):
    net = Imported(image_size=(32, 32), exclude=["layer4.*"])
    model = build_model("torchvision.models:resnet18", 10, 3, imported=net)
    save_model(tmp_path / "m.pt", model, "torchvision.models:resnet18", 10, 3)
    again, record = load_model(tmp_path / "m.pt")
    assert record["imported"]["exclude"] == ["layer4.*"]
    assert [layer.name for layer in again.prunable_layers()][-1] == "layer3.1.conv1"


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"train_teacher": {"arch": ":build"}}, "expected a registered name or package.module:factory"),
        ({"train_teacher": {"arch_kwargs": {"width": 2}}}, "for a package.module:factory arch only"),
        ({"train_teacher": {"layers_exclude": ["stem*"]}}, "for a package.module:factory arch only"),
        ({"train_teacher": {"epochs": 0}}, "set train_teacher.init_checkpoint"),
        ({"data": {"normalization": {"mean": [0.5], "std": [0.5, 0.2]}}}, "one value per channel"),
        ({"train_teacher": {"arch": "torchvision.models:resnet18"}}, "does not run on 1x28x28 images"),
    ],
)
def test_params_of_an_imported_model_are_checked_up_front(raw: dict, message: str):
    with pytest.raises(InputError, match=message):
        validate_params(raw, "params.yaml")


def test_an_imported_model_validates_against_the_dataset_shape():
    params = validate_params(
        {
            "data": {"dataset": "cifar10"},
            "train_teacher": {"arch": "torchvision.models:mobilenet_v3_small", "layers_exclude": ["*.fc1"]},
            "fit_dca": {"layer": "features.4"},
        },
        "params.yaml",
    )
    layout = model_layout(params)
    assert layout.prunable_layers()[0].name == "features.1.block.2.0"
    assert all(not layer.name.endswith("fc1") for layer in layout.prunable_layers())


@pytest.mark.parametrize("arch", ["torchvision.models:mobilenet_v3_small", "timm.models.resnet:resnet18"])
def test_every_criterion_and_budget_runs_on_a_foreign_model(arch: str):
    """Statistics on the discovered tensors, every criterion (bn_gamma refuses a layer without a BN, by
    name), and every budget, the flops_target one with the silencing probe, on a model cdc never saw."""
    torch.manual_seed(0)
    model = build_model(arch, 4, 3, imported=IMPORTED).eval()
    names, widths = [layer.name for layer in model.prunable_layers()], model.prunable_widths()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, *SHAPE, generator=g), torch.arange(16) % 4) for _ in range(2)]
    stats, grid = collect_all_stats(model, batches, 4, grid=2)
    assert list(stats) == names and [s.s1.shape[1] for s in stats.values()] == widths
    blocks = {layer: block for block, layers in model.layer_blocks().items() for layer in layers}
    fine_to_coarse = np.array([0, 0, 1, 1])
    scores: dict[str, list[np.ndarray]] = {}
    for criterion in CRITERIA.values():
        if criterion.source in ("stats", "grid"):
            by = stats if criterion.source == "stats" else grid
            scored = score_layers(by, criterion.name, fine_to_coarse, 2, 0, None, blocks)
            scores[criterion.name] = [s.scores for s in scored]
        elif criterion.name == "taylor":
            scores["taylor"] = list(taylor_scores(model, batches, 2).values())
        elif criterion.name == "bn_gamma" and any(layer.norm is None for layer in model.prunable_layers()):
            with pytest.raises(InputError, match="has no BatchNorm"):
                weight_scores("bn_gamma", model, SHAPE)
            continue
        else:
            scores[criterion.name] = list(weight_scores(criterion.name, model, SHAPE).values())
        assert [len(s) for s in scores[criterion.name]] == widths, criterion.name
        assert all(np.isfinite(s).all() for s in scores[criterion.name]), criterion.name

    @functools.cache
    def count(w: tuple[int, ...]) -> int:
        return count_macs_of(lambda: build_model(arch, 4, 3, list(w), imported=IMPORTED), SHAPE)

    def flops(w: list[int]) -> int:
        return count(tuple(w))

    symdiv = scores["symdiv"]
    budgets = {
        "uniform": ({"ratio": 0.5}, None),
        "per_layer": ({"ratios": [0.25] * len(widths)}, None),
        "global": ({"flops_target": 0.8}, BudgetProbe(flops, symdiv)),
        "flops_target": (
            {"flops_target": 0.95, "sensitivity_step": 0.05},  # one round of probes
            silencing_probe(model, symdiv, batches, flops),
        ),
    }
    for budget, (extra, probe) in budgets.items():
        keep = keep_counts(budget, names, widths, PruneParams().model_dump() | extra, probe)
        assert all(1 <= k <= w for k, w in zip(keep, widths, strict=True)), budget
        if budget in ("global", "flops_target"):
            assert flops(keep) <= extra["flops_target"] * flops(widths) * 1.02, budget


def test_a_model_the_onnx_exporter_cannot_handle_fails_export_in_one_line(tmp_path: Path):
    """A forward that branches on its values cannot be exported by torch.export: the stage's error names
    the exporter and the architecture in one line, and no half-written file is left behind."""

    class Branches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return y.mean((2, 3)) if y.sum() > 0 else y.amax((2, 3))

    target = tmp_path / "student.onnx"
    raises = pytest.raises(InputError, match="the ONNX exporter cannot export models.odd:build")
    with raises as failure, atomic_path(target) as tmp, exporting("ONNX", "models.odd:build"):
        export_onnx(Branches(), torch.zeros(2, 3, 8, 8), tmp)
    assert list(tmp_path.iterdir()) == []
    assert "\n" not in str(failure.value) and "\x1b" not in str(failure.value)
