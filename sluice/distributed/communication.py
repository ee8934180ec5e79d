"""Collectives over the tensor-parallel group. With one rank each is the identity.

All of them are plain ``torch.distributed`` calls on the device group, so on CUDA (NCCL) they are
captured into CUDA graphs like any other kernel once the communicator exists (the start-up profile
step creates it before capture).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from sluice.distributed.parallel_state import get_tp_group


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over the ranks, in place."""
    group = get_tp_group()
    if group is None or group.world_size == 1:
        return x
    dist.all_reduce(x, group=group.device_group)
    return x


def tp_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The ranks' ``x`` concatenated along ``dim`` in rank order (every rank gets the whole)."""
    group = get_tp_group()
    if group is None or group.world_size == 1:
        return x
    x = x.contiguous()
    if x.is_cuda:
        gathered = torch.empty((group.world_size, *x.shape), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(gathered, x, group=group.device_group)
        parts = gathered.unbind(0)
    else:  # gloo has no all_gather_into_tensor
        parts = [torch.empty_like(x) for _ in range(group.world_size)]
        dist.all_gather(parts, x, group=group.device_group)
    return torch.cat(parts, dim=dim)


def tp_broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s ``x`` on every rank, in place (the step's sampled ids)."""
    group = get_tp_group()
    if group is None or group.world_size == 1:
        return x
    dist.broadcast(x, src=src, group=group.device_group)
    return x


def tp_min_int(value: int) -> int:
    """The smallest of the ranks' ``value`` (on the CPU group): what every rank agrees on."""
    group = get_tp_group()
    if group is None or group.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group.cpu_group)
    return int(t.item())
