"""Several processes on one stage, as torchrun launches them (gloo on CPU, NCCL on GPU).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; `init()` reads them once per process. CDC's statistics
and DCA scatters are sums, so each rank streams its share of the images and the float64 sums are
all-reduced: the result is the one-process result up to the order of float64 additions. Training wraps
the model in DistributedDataParallel, each rank drawing its share of every global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported when a process group is used, not to ask "am I rank 0?"
    import torch


@dataclass(frozen=True)
class Group:
    """This process's place: `rank` of `world` processes (world 1: a plain one-process run)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the outputs, checkpoints and MLflow records; the others only compute."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def shard(self) -> tuple[int, int]:
        return self.rank, self.world


_GROUP = Group()


def launched() -> bool:
    """Whether torchrun (or another launcher that sets WORLD_SIZE > 1) started this process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_follower() -> bool:
    """Whether this process is a torchrun rank other than 0 (known from the environment, before `init`)."""
    return launched() and int(os.environ.get("RANK", "0")) > 0


def init(device: torch.device | None = None) -> Group:
    """Join the process group torchrun set up (idempotent); a plain process gets Group()."""
    global _GROUP
    if not launched():
        return _GROUP
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = device is not None and device.type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    _GROUP = Group(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return _GROUP


def current() -> Group:
    return _GROUP


def all_reduce_sum(*tensors: torch.Tensor) -> None:
    """Sum each tensor over the ranks, in place (nothing in a one-process run)."""
    if not _GROUP.active:
        return
    import torch.distributed as dist

    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def any_rank(flag: bool) -> bool:
    """Whether `flag` is set on any rank (every rank must ask at the same point)."""
    if not _GROUP.active:
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    if _GROUP.active:
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(obj: object) -> object:
    """Rank 0's `obj` on every rank."""
    if not _GROUP.active:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown() -> None:
    global _GROUP
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    _GROUP = Group()
