"""Sizes and allocates the paged KV cache: one tensor per layer, all layers the same shape.

    kv_cache[layer]: [2, num_blocks, block_size, num_kv_heads, head_dim]   (0 = K, 1 = V)

On CUDA the number of blocks comes from what is left of ``gpu_memory_utilization`` x
total memory after weights and a profiled peak step; on CPU from ``kv_cache_memory`` (CacheConfig decides
the default; the CPU's pages are zeroed lazily, as blocks are first written).
``num_kv_blocks`` overrides both.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_per_block // self.block_size


def num_blocks_for_memory(spec: KVCacheSpec, available_bytes: int) -> int:
    return max(0, available_bytes // spec.bytes_per_block)


def allocate_kv_caches(spec: KVCacheSpec, num_blocks: int, device: torch.device) -> list[torch.Tensor]:
    shape = (2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
    return [zeros(shape, spec.dtype, device) for _ in range(spec.num_layers)]


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.zeros``, but on the CPU from calloc (numpy's zeros): the OS hands out zeroed pages as they are
    first touched, so the part of the budget no request reaches costs neither time nor resident memory.
    ``torch.zeros`` writes every byte: 0.3 s and 1 GiB resident for the default 1 GiB budget at start-up."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    num_bytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(num_bytes, dtype=np.uint8)).view(dtype).view(shape)


def available_gpu_kv_bytes(device: torch.device, gpu_memory_utilization: float) -> int:
    """What the KV cache may take: utilization x total, minus what weights and the peak step used."""
    free, total = torch.cuda.mem_get_info(device)
    peak = torch.cuda.max_memory_allocated(device)
    # Memory held by others (another process, the CUDA context) counts against the budget too.
    used_by_others = total - free - torch.cuda.memory_reserved(device)
    budget = int(total * gpu_memory_utilization) - peak - max(used_by_others, 0)
    logger.info("GPU memory: total %.1f GiB, peak step %.2f GiB, others %.2f GiB, KV budget %.2f GiB",
                total / 2**30, peak / 2**30, max(used_by_others, 0) / 2**30, budget / 2**30)
    return max(budget, 0)
