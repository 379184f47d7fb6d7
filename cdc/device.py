"""Where models run: the device, mixed precision and determinism of one stage.

A `Runtime` is resolved once per stage from the `runtime` params section and passed to the loops.
On CPU it is a no-op (full precision, no scaler), so CPU results are those of a plain PyTorch loop.
On CUDA, training and distillation run under autocast: bfloat16 where the GPU supports it (no loss
scaling needed), else float16 with a gradient scaler.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from cdc.errors import InputError

DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"


def resolve_device(spec: str) -> torch.device:
    """`auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`, checked against this machine."""
    if not re.fullmatch(DEVICE_PATTERN, spec):
        raise InputError(f"runtime.device={spec!r} is not a device; use auto, cpu, cuda or cuda:N")
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise InputError(
            f"runtime.device={spec!r} but CUDA is not available here (torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda or 'none'}, no GPU visible); use auto or cpu"
        )
    index = int(spec.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise InputError(
            f"runtime.device={spec!r} but this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return torch.device("cuda", index)


@dataclass(frozen=True)
class Runtime:
    """The device a stage runs on and the autocast dtype of its training steps (None: full precision)."""

    device: torch.device
    amp_dtype: torch.dtype | None = None

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Mixed precision for a training step's forward pass and loss; nothing on CPU."""
        if self.amp_dtype is None:
            yield
        else:
            with torch.autocast(self.device.type, dtype=self.amp_dtype):
                yield

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling, enabled only for float16 (bfloat16 has float32's range)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def describe(self) -> str:
        """A label for logs and reports, e.g. `cuda:0 (NVIDIA H200, bf16 autocast)` or `cpu (2 threads)`."""
        if not self.is_cuda:
            return f"cpu ({torch.get_num_threads()} threads)"
        precision = {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}.get(
            self.amp_dtype,  # type: ignore[arg-type]
            "fp32",
        )
        return f"{self.device} ({torch.cuda.get_device_name(self.device)}, {precision})"


CPU = Runtime(torch.device("cpu"))


def make_runtime(device: str = "auto", mixed_precision: bool = True, deterministic: bool = False) -> Runtime:
    """Resolve the device and set the process-wide backend flags that go with it.

    cuDNN autotuning (`cudnn.benchmark`) picks the fastest kernels but not always the same ones, so it
    is off, and deterministic algorithms are on, when `deterministic` is asked for.
    """
    dev = resolve_device(device)
    if dev.type != "cuda":
        return Runtime(dev)
    torch.cuda.set_device(dev)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS reproducibility
        torch.use_deterministic_algorithms(True)
    amp = None
    if mixed_precision:
        amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return Runtime(dev, amp)


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one), e.g. `Intel(R) Xeon(R) Processor`."""
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    for line in lines:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_description() -> str:
    """The line every recorded figure carries: CPU model, cores visible, torch and its thread count,
    and the GPU when one is visible (a run on a GPU machine says so)."""
    threads = torch.get_num_threads()
    text = f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} ({threads} threads)"
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name()}"
    return text


def float_platform() -> str:
    """What, besides its inputs, decides a CPU run's floating-point results: the CPU, PyTorch's CPU
    kernel path (`ATEN_CPU_CAPABILITY` can lower it) and the torch build. Two runs that share it give
    byte-identical outputs; two that do not may train different weights (MKL and oneDNN round
    differently), e.g. `Intel(R) Xeon(R) Processor, AVX512 kernels, torch 2.14.1+cu130`."""
    return f"{cpu_model()}, {torch.backends.cpu.get_cpu_capability()} kernels, torch {torch.__version__}"


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host tensor to `device` through pinned memory, asynchronously; unchanged on CPU."""
    if device.type == "cpu":
        return x
    return x.pin_memory().to(device, non_blocking=True)
