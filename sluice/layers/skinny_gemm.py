"""y = x W^T (+ b) for few rows of x: the matmuls of small decode steps, which only stream the weight.

A decode step of a few requests multiplies a handful of rows by every weight of the model, so its
time is the time to read the weights from HBM (16 GB for an 8B model). One program owns
``BLOCK_N`` output features for all rows of x and streams its [BLOCK_N, K] slice of W through a
software pipeline (``num_stages`` tiles in flight); the x rows are re-read from L2 at every K step.
Narrow output slices give enough programs to cover every SM even for N = 4096:

    W [N, K] row-major (nn.Linear's layout)      program n: rows n * BLOCK_N .. (n + 1) * BLOCK_N
    x [M, K], M <= BLOCK_M                        acc[BLOCK_M, BLOCK_N] += x_tile @ W_tile^T (fp32)

Only half-precision weights take this path (``can_serve``): float32 keeps ``F.linear``, whose
results the CPU reference and the float32 GPU equivalence tests compare against. Launches are CUDA
graph safe: the grid and the config come from shapes alone.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

# Rows of x up to which the skinny kernel serves a matmul; above it cuBLAS's tiles win.
MAX_ROWS = 16
HALF_DTYPES = (torch.float16, torch.bfloat16)


class SkinnyConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def can_serve(x: torch.Tensor, weight: torch.Tensor, max_rows: int = MAX_ROWS) -> bool:
    """Whether ``skinny_linear`` serves ``F.linear(x, weight)``: a CUDA half-precision matmul of at
    most ``max_rows`` rows whose weight is contiguous and whose K is a multiple of 64."""
    return (x.is_cuda and x.dtype in HALF_DTYPES and weight.dtype == x.dtype and weight.dim() == 2
            and weight.is_contiguous() and x.shape[-1] == weight.shape[1] and weight.shape[1] % 64 == 0
            and 0 < x.numel() // x.shape[-1] <= max_rows)


def choose_config(num_rows: int, n: int, k: int) -> SkinnyConfig:
    """Tile shape for an [num_rows, k] x [k, n] product: narrow output slices when N is small so
    that every SM has a program, wide K tiles so that each load moves enough bytes."""
    block_m = max(16, triton.next_power_of_2(num_rows))
    block_n = 32 if n <= 8192 else 64
    block_k = 256 if k % 256 == 0 else (128 if k % 128 == 0 else 64)
    return SkinnyConfig(block_m, block_n, block_k, num_warps=4, num_stages=4)


@triton.jit
def _skinny_gemm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    # K is a multiple of BLOCK_K (choose_config), so only rows of x and of W need masks.
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, K // BLOCK_K):
        x = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
        w = tl.load(w_ptrs, mask=n_mask[:, None], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  config: SkinnyConfig | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for the shapes ``can_serve`` accepts (any leading dims of x)."""
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    num_rows = x2.shape[0]
    config = config or choose_config(num_rows, n, k)
    if k % config.block_k or num_rows > config.block_m:
        raise ValueError(f"config {config} does not fit a [{num_rows}, {k}] x [{k}, {n}] product")
    y = torch.empty(num_rows, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, config.block_n),)
    _skinny_gemm_kernel[grid](
        x2, weight, bias if bias is not None else weight, y, num_rows, n, k,
        x2.stride(0), weight.stride(0), y.stride(0), HAS_BIAS=bias is not None,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages)
    return y.reshape(*x.shape[:-1], n)
