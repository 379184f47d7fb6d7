"""The project's one FLOPs convention: multiply-accumulates of conv and linear layers.

Counted at the dataset's input size for one image; BN, ReLU, pooling, additions and biases are not
counted. PyTorch's own `torch.utils.flop_counter` does the counting (it reads the dispatched aten ops,
so grouped, strided and dilated convs are right by construction); its FLOPs are 2 x MACs, and only its
convolution and matrix-multiply entries are kept. Parameters: every learnable parameter.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

_aten = torch.ops.aten
COUNTED_OPS = (_aten.convolution, _aten._convolution, _aten.addmm, _aten.mm, _aten.bmm, _aten.matmul)


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """MACs of one eval-mode forward pass of a single image of shape (C, H, W)."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad():
            model(torch.zeros(1, *input_shape, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
    flops = counter.get_flop_counts().get("Global", {})
    return int(sum(v for op, v in flops.items() if op in COUNTED_OPS)) // 2


def count_params(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))


def count_macs_of(build: Callable[[], nn.Module], input_shape: tuple[int, ...]) -> int:
    """`count_macs` of a model made by `build` for counting only, on the meta device: the formulas read
    shapes alone, and no kernel runs (a FLOPs budget counts hundreds of candidate widths; on a CPU, each
    new conv shape costs oneDNN a primitive). A forward that needs values is counted on the CPU."""
    try:
        return count_macs(build().to("meta"), input_shape)
    except (NotImplementedError, RuntimeError):
        return count_macs(build(), input_shape)
