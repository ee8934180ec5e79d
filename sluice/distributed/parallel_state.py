"""The tensor-parallel group of this process: one per process, set up before the model is built.

Every rank joins one ``torch.distributed`` world of ``tp_size`` processes over a TCP store on loopback:

    device group   NCCL on CUDA (collectives capturable in CUDA graphs), gloo on the CPU
    CPU group      gloo on both: small host-side agreements (the KV block count)

Without a group (TP = 1, the default) ``get_tp_rank_and_size`` is (0, 1) and nothing here is touched.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# NVLink SHARP (multicast) objects can outlive a killed process and wedge the next start; workers inherit these.
NCCL_ENV_DEFAULTS = {"NCCL_NVLS_ENABLE": "0", "NCCL_CUMEM_ENABLE": "0", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}


@dataclass(frozen=True, slots=True)
class TPGroup:
    rank: int
    world_size: int
    device_group: dist.ProcessGroup
    cpu_group: dist.ProcessGroup


_TP: TPGroup | None = None


def get_tp_group() -> TPGroup | None:
    return _TP


def get_tp_rank_and_size() -> tuple[int, int]:
    """(rank, world size) of this process's tensor-parallel group; (0, 1) without one."""
    return (0, 1) if _TP is None else (_TP.rank, _TP.world_size)


def set_nccl_env_defaults() -> None:
    """Sets NCCL_ENV_DEFAULTS where the environment leaves them unset (before any worker is spawned)."""
    for name, value in NCCL_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)


def init_tp_group(rank: int, world_size: int, init_method: str, device_type: str,
                  timeout_s: float = 600.0) -> TPGroup:
    """Joins the world (blocks until every rank has) and makes this process's TP group."""
    global _TP
    if _TP is not None:
        raise RuntimeError("this process already belongs to a tensor-parallel group")
    set_nccl_env_defaults()
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timeout)
    device_group = dist.group.WORLD
    cpu_group = device_group if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    _TP = TPGroup(rank, world_size, device_group, cpu_group)
    return _TP


def destroy_tp_group() -> None:
    """Leaves the world (idempotent): this process is a single rank again."""
    global _TP
    _TP = None
    if dist.is_initialized():
        dist.destroy_process_group()
