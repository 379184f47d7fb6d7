"""The `runtime` setting: device resolution and its errors, a no-op on CPU, and (on a CUDA machine,
`pytest -m gpu`, run by bench/gpu_check.sh) mixed precision, device-side sums and CPU-loadable checkpoints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cdc.data import Split
from cdc.dca import ScatterAccumulator, accumulate_scatter
from cdc.device import CPU, make_runtime, resolve_device
from cdc.io import load_model, save_model
from cdc.latency import compare_latency
from cdc.models import build_model
from cdc.params import ParamsError, validate_params
from cdc.stats import collect_stats, confusion_matrix
from cdc.train import evaluate, sgd, train_one_epoch, warmup_cosine
from tests.conftest import batches

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (run bench/gpu_check.sh on a GPU machine)")


def test_cpu_and_auto_resolve_on_this_machine():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if HAS_CUDA else "cpu")


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only error")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:1"])
def test_asking_for_cuda_without_a_gpu_says_so(spec: str):
    with pytest.raises(ValueError, match=r"runtime.device=.*CUDA is not available.*use auto or cpu"):
        resolve_device(spec)


def test_a_device_that_is_not_one_is_refused_by_the_params_schema():
    with pytest.raises(ParamsError, match=r"runtime.device.*'gpu0'"):
        validate_params({"runtime": {"device": "gpu0"}}, "test")
    with pytest.raises(ValueError, match="not a device"):
        resolve_device("tpu")


def test_cpu_runtime_is_full_precision_without_loss_scaling():
    runtime = make_runtime("cpu", mixed_precision=True, deterministic=True)
    assert runtime == CPU and runtime.amp_dtype is None
    assert not runtime.grad_scaler().is_enabled()
    assert runtime.describe().startswith("cpu (")


def _train_step_state(small_split: Split, device: str) -> tuple[dict[str, torch.Tensor], float]:
    torch.manual_seed(0)
    runtime = make_runtime(device)
    model = build_model("resnet20", 10, 1).to(runtime.device)
    loader = batches(small_split, 100, shuffle=True, augment=True, seed=0, device=runtime.device)
    opt = sgd(model, 0.05, 0.9, 5e-4)
    result = train_one_epoch(model, loader, opt, warmup_cosine(opt, len(loader), 0), runtime=runtime)
    return {k: v.cpu() for k, v in model.state_dict().items()}, result.loss


@gpu
@pytest.mark.gpu
def test_mixed_precision_training_on_cuda_tracks_the_cpu_run(small_split: Split):
    cpu_state, cpu_loss = _train_step_state(small_split, "cpu")
    gpu_state, gpu_loss = _train_step_state(small_split, "cuda")
    assert np.isfinite(gpu_loss) and abs(gpu_loss - cpu_loss) < 0.1 * cpu_loss
    drift = max((gpu_state[k].float() - v.float()).abs().max().item() for k, v in cpu_state.items())
    assert drift < 0.5  # same data, crops and init: bf16 rounding only, not a different run


@gpu
@pytest.mark.gpu
def test_statistics_and_dca_sums_on_cuda_equal_the_cpu_ones(small_split: Split):
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 1).eval()
    cpu_stats = collect_stats(model, batches(small_split, 64), 10)
    cuda_model = model.to("cuda")
    cuda_stats = collect_stats(cuda_model, batches(small_split, 64, device="cuda"), 10)
    for name, st in cpu_stats.items():
        np.testing.assert_array_equal(cuda_stats[name].n, st.n)
        np.testing.assert_allclose(cuda_stats[name].s1, st.s1, rtol=2e-3, atol=1e-3)  # TF32 convs
    cm = confusion_matrix(cuda_model, batches(small_split, 64, device="cuda"), 10)
    assert cm.sum() == len(small_split)
    # identical features: the float64 sums agree to rounding
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(500, 64)), rng.integers(0, 4, 500)
    on_cpu, on_gpu = ScatterAccumulator(4, 64), ScatterAccumulator(4, 64, "cuda")
    for acc in (on_cpu, on_gpu):
        acc.update(x, y)
    for a, b in zip(on_gpu.scatters(), on_cpu.scatters(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-9)
    acc = accumulate_scatter(cuda_model, "layer2", 4, batches(small_split, 64, device="cuda"), np.arange(10))
    assert acc.gram.shape == (512, 512) and acc.counts.sum() == len(small_split)


@gpu
@pytest.mark.gpu
def test_a_checkpoint_written_on_cuda_loads_on_a_cpu_only_machine(tmp_path: Path, small_split: Split):
    model = build_model("resnet20", 10, 1).to("cuda")
    save_model(tmp_path / "m.pt", model, "resnet20", 10, 1)
    code = (
        "import sys, torch; from cdc.io import load_model; "
        "r = torch.load(sys.argv[1], weights_only=True); "
        "assert all(v.device.type == 'cpu' for v in r['state_dict'].values()); load_model(sys.argv[1])"
    )
    env = {"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.pt")], check=True, env=env)
    reloaded, _ = load_model(tmp_path / "m.pt")
    acc = evaluate(reloaded, batches(small_split, 100)).accuracy
    assert abs(acc - evaluate(model, batches(small_split, 100, device="cuda")).accuracy) <= 0.02


@gpu
@pytest.mark.gpu
def test_latency_is_timed_on_the_gpu():
    model = build_model("resnet20", 10, 1).to("cuda").eval()
    x = torch.randn(64, 1, 28, 28, device="cuda")
    lat = compare_latency(
        {"a": lambda: model(x), "b": lambda: model(x)}, rounds=5, device=torch.device("cuda")
    )
    assert 0 < lat["a"].ms < 1000 and lat["b"].speedup > 0
