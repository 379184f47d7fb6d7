"""Inference forms of a trained model: what a deployment runs, so its latency is what a user gets.

Fewer FLOPs only pay if the runtime turns them into less time. The forms here are the field's usual
ones, each a separate step so its effect can be measured alone (bench/student_speedup.py):
BN folded into the preceding conv (PyTorch's FX fuser), channels-last memory layout, `torch.compile` of
the folded model (compiles on its first call: tens of seconds on a small CPU), and an ONNX export run by
ONNX Runtime (which folds BN itself and has a lower per-operator cost than eager PyTorch).
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.fx.experimental.optimization as fx_optimization
from torch import nn

from cdc.errors import InputError
from cdc.latency import Forward
from cdc.registry import Registry

log = logging.getLogger(__name__)

# what is timed (evaluate.latency_form), each a builder (model, x, threads) -> a no-argument forward
INFERENCE_FORMS: Registry[Callable[[nn.Module, torch.Tensor, int | None], Forward]] = Registry(
    "inference form"
)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy with every conv -> BN pair folded into one conv (same outputs up to rounding).
    A model torch.fx cannot trace (control flow on tensor values) stays as it is, with a warning."""
    try:
        return fx_optimization.fuse(copy.deepcopy(model).eval(), inplace=True)
    except Exception as err:  # noqa: BLE001 - any tracing failure: the unfolded model is still right
        log.warning("BN not folded: torch.fx cannot trace %s (%s)", type(model).__name__, str(err)[:200])
        return copy.deepcopy(model).eval()


class Deployable(nn.Module):
    """A model with its input normalization in front: takes float images in [0, 1] (N x C x H x W), so
    a serving stack needs no dataset statistics."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def export_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """TorchScript (traced; the networks here have no data-dependent control flow) for C++ and
    TorchServe deployments. PyTorch deprecates TorchScript for torch.export; those runtimes still load it."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit", FutureWarning)
        # to a buffer: saved to a file, the archive's records are named after the file
        path.write_bytes(torch.jit.trace(copy.deepcopy(model).eval(), example).save_to_buffer())


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit", FutureWarning)
        return torch.jit.load(str(path))


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path | None = None) -> bytes:
    """ONNX export (torch.export based) with a dynamic batch dimension, input `images`, output `logits`."""
    program = torch.onnx.export(
        copy.deepcopy(model).eval(),
        (example,),
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        dynamo=True,
        verbose=False,
    )
    proto = program.model_proto
    # each node's source stack trace names the files of the checkout and virtualenv that exported it: the
    # same model exported from another folder would be other bytes (and disclose the exporter's paths)
    for graph in (proto.graph, *proto.functions):
        for node in graph.node:
            kept = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
            del node.metadata_props[:]
            node.metadata_props.extend(kept)
    data = proto.SerializeToString()
    if path is not None:
        path.write_bytes(data)
    return data


def onnx_session(onnx_bytes: bytes, threads: int | None = None):  # -> onnxruntime.InferenceSession
    """A CPU ONNX Runtime session with `threads` intra-op threads (None: ONNX Runtime's default).

    Idle worker threads sleep rather than spin: spinning threads steal the cores that the other models
    of an interleaved measurement (and other tenants of a shared machine) are timed on.
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])


def inference_forward(model: nn.Module, form: str, x: torch.Tensor, threads: int | None = None) -> Forward:
    """A no-argument callable that runs `model` on `x` in the given inference form."""
    return INFERENCE_FORMS.get(form)(model.eval(), x, threads)


@INFERENCE_FORMS.register("eager")
def _eager(model: nn.Module, x: torch.Tensor, _threads: int | None) -> Forward:
    return lambda: model(x)


@INFERENCE_FORMS.register("folded")
def _folded(model: nn.Module, x: torch.Tensor, _threads: int | None) -> Forward:
    folded = fold_batchnorm(model)
    return lambda: folded(x)


@INFERENCE_FORMS.register("folded_channels_last")
def _folded_channels_last(model: nn.Module, x: torch.Tensor, _threads: int | None) -> Forward:
    folded = fold_batchnorm(model).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    return lambda: folded(x_cl)


@INFERENCE_FORMS.register("compiled")
def _compiled(model: nn.Module, x: torch.Tensor, _threads: int | None) -> Forward:
    compiled = torch.compile(fold_batchnorm(model))
    return lambda: compiled(x)


@INFERENCE_FORMS.register("onnxruntime")
def _onnxruntime(model: nn.Module, x: torch.Tensor, threads: int | None) -> Forward:
    if x.device.type != "cpu":
        raise InputError("the onnxruntime inference form runs on CPU only")
    session = onnx_session(export_onnx(model, x), threads)
    feed = {"images": np.ascontiguousarray(x.numpy())}
    return lambda: session.run(None, feed)
