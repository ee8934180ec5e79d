"""Split-K reduction inside a GEMM kernel, for the decode-sized GEMMs of triton_w4a16.py and triton_fp8.py.

A decode step's GEMM has a few rows, so its [M, N] output has too few tiles to keep every SM reading the
weights; the K range is split over ``split_k`` programs per tile. Their float32 sums meet in a workspace:

    every program     atomic_add(workspace[tile], acc); barrier; arrivals = atomic_add(counter[tile], 1)
    the last to come  total = the workspace tile (read with atomics: coherent in L2), writes the output in
                      its dtype, and zeroes the workspace tile and the counter for the next call

so one launch does the whole GEMM (no float32 partials summed by separate kernels). The workspace is one
per device, zeroed at allocation and left zeroed by every call; it is reserved while the model loads
(``reserve``) and only ever grows outside CUDA graph capture, and an outgrown buffer is kept alive, since a
captured graph may still point at it. Callers share it, so kernels that use it must run on one stream.
The float32 sum's order depends on arrival order: results may differ in the last bit from run to run.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_WORKSPACES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
_OUTGROWN: list[tuple[torch.Tensor, torch.Tensor]] = []


def _device_key(device: torch.device | str) -> torch.device:
    """``cuda`` and ``cuda:<current>`` are one device (layers may say the first, tensors say the second)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def reserve(device: torch.device, numel: int, num_tiles: int) -> None:
    """Makes the device's workspace hold ``numel`` float32 values and ``num_tiles`` counters."""
    device = _device_key(device)
    current = _WORKSPACES.get(device)
    if current is not None and current[0].numel() >= numel and current[1].numel() >= num_tiles:
        return
    if current is not None:
        _OUTGROWN.append(current)
        numel, num_tiles = max(numel, current[0].numel()), max(num_tiles, current[1].numel())
    _WORKSPACES[device] = (torch.zeros(numel, dtype=torch.float32, device=device),
                           torch.zeros(num_tiles, dtype=torch.int32, device=device))


def workspace(device: torch.device, numel: int, num_tiles: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The device's workspace if it is large enough (grown first when not capturing a CUDA graph), else None."""
    device = _device_key(device)
    current = _WORKSPACES.get(device)
    if current is None or current[0].numel() < numel or current[1].numel() < num_tiles:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        reserve(device, numel, num_tiles)
        current = _WORKSPACES[device]
    return current


@triton.jit
def store_tile(acc, out_ptr, stride_om, offs_m, offs_n, mask, workspace_ptr, counter_ptr, tile_id, split_k, N,
               REDUCE_IN_KERNEL: tl.constexpr):
    """Writes a program's float32 tile: straight to ``out`` (one K slice), or through the workspace, where
    the last of the tile's ``split_k`` programs writes the sum (the workspace holds [M, N] row-major)."""
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    if REDUCE_IN_KERNEL:
        ws_ptrs = workspace_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.atomic_add(ws_ptrs, acc, mask=mask)
        tl.debug_barrier()  # every thread's adds are issued before the arrival is counted (release, cumulative)
        arrivals = tl.atomic_add(counter_ptr + tile_id, 1)
        if arrivals == split_k - 1:
            total = tl.where(mask, tl.atomic_add(ws_ptrs, tl.zeros_like(acc), mask=mask), 0.0)  # masked: undefined
            tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(ws_ptrs, tl.zeros_like(acc), mask=mask)
            tl.atomic_xchg(counter_ptr + tile_id, 0)
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def num_tiles(m: int, n: int, block_m: int, block_n: int) -> int:
    return triton.cdiv(m, block_m) * triton.cdiv(n, block_n)


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the interpreter: an H100's count, so that tests see the same tiles as the GPU


def decode_split_k(m: int, n: int, k: int, block_m: int, block_n: int, block_k: int, device: torch.device) -> int:
    """K slices for a weight-streaming GEMM: about two waves of programs, each slice at least 4 BLOCK_K steps
    (so that few sums meet per tile), at most 16."""
    tiles = num_tiles(m, n, block_m, block_n)
    return max(1, min(2 * num_sms(device) // tiles, triton.cdiv(k, block_k) // 4, 16))


@dataclass(frozen=True, slots=True)
class TileConfig:
    """Tiles of a split-K GEMM launch; ``reduce``: atomic (in the kernel) | partials (float32, summed after)."""
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4
    reduce: str = "atomic"


@dataclass(frozen=True, slots=True)
class SplitKLaunch:
    """One launch's grid (tiles, K slices), its output and, for in-kernel sums, the workspace."""
    grid: tuple[int, int]
    k_per_split: int
    out: torch.Tensor  # [M, N] in the output dtype, or [split_k, M, N] float32 partials
    workspace: tuple[torch.Tensor, torch.Tensor] | None

    @property
    def split_k(self) -> int:
        return self.grid[1]

    @property
    def reduce_in_kernel(self) -> bool:
        return self.workspace is not None

    def kernel_args(self) -> tuple:
        """out, workspace values, counters, k_per_split, split_k, stride of the K slices, row stride of out."""
        values, counters = self.workspace or (self.out, self.out)
        return (self.out, values, counters, self.k_per_split, self.split_k,
                self.out.stride(0) if self.out.dim() == 3 else 0, self.out.stride(-2))

    def result(self, dtype: torch.dtype) -> torch.Tensor:
        return self.out.sum(dim=0).to(dtype) if self.out.dim() == 3 else self.out


def plan_launch(m: int, n: int, k: int, config: TileConfig, out_dtype: torch.dtype,
                device: torch.device) -> SplitKLaunch:
    k_per_split = triton.cdiv(triton.cdiv(k, config.split_k), config.block_k) * config.block_k
    split_k = triton.cdiv(k, k_per_split)  # every slice non-empty: the tile's arrivals count to split_k
    tiles = num_tiles(m, n, config.block_m, config.block_n)
    ws = workspace(device, m * n, tiles) if split_k > 1 and config.reduce == "atomic" else None
    if split_k == 1 or ws is not None:
        out = torch.empty(m, n, dtype=out_dtype, device=device)
    else:  # partials asked for, or capturing a CUDA graph with a workspace too small
        out = torch.empty(split_k, m, n, dtype=torch.float32, device=device)
    return SplitKLaunch((tiles, split_k), k_per_split, out, ws)
