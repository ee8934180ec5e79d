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

import torch
import triton
import triton.language as tl

_WORKSPACES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
_OUTGROWN: list[tuple[torch.Tensor, torch.Tensor]] = []


def reserve(device: torch.device, numel: int, num_tiles: int) -> None:
    """Makes the device's workspace hold ``numel`` float32 values and ``num_tiles`` counters."""
    device = torch.device(device)
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
    device = torch.device(device)
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
