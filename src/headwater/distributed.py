"""Thin helpers over ``torch.distributed``: the same code runs on one process or on many.

headwater never launches processes: start them with ``torchrun`` (or any launcher that sets
RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT) and call ``torch.distributed.init_process_group``
before creating the ``Attributor``. Without an initialized process group everything here is a
no-op for a world of size 1.

Work split (see ``Attributor``): batch b of a pass belongs to rank ``b % world``. Per-batch label
seeds depend only on the batch's first example index, so the union of the ranks' work is
exactly the single-process computation, and factors and scores agree to float tolerance.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["rank_world", "all_reduce_", "broadcast_", "all_reduce_max", "barrier", "is_main"]


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when no process group is initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_world()[0] == 0


def _comm_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo moves CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum every tensor across ranks, in place (keys visited in sorted order on every rank)."""
    if rank_world()[1] == 1:
        return tensors
    dev = _comm_device()
    for key in sorted(tensors):
        t = tensors[key]
        buf = t.to(dev).contiguous()  # collectives read raw memory: strides must be the default
        dist.all_reduce(buf)
        if buf is not t:
            t.copy_(buf)
    return tensors


def broadcast_(tensors: list[torch.Tensor], src: int) -> list[torch.Tensor]:
    """Overwrite ``tensors`` on every rank with rank ``src``'s values, in place."""
    if rank_world()[1] == 1:
        return tensors
    dev = _comm_device()
    for t in tensors:
        buf = t.to(dev).contiguous()  # eigh returns column-major eigenvectors
        dist.broadcast(buf, src=src)
        if buf is not t:
            t.copy_(buf)
    return tensors


def all_reduce_max(value: int) -> int:
    if rank_world()[1] == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()
