"""Triton kernels of the FP8 W8A8 path on CUDA (fp8.py keeps the torch reference and chooses).

    quantize_activations    x [M, K] (16/32-bit) -> float8_e4m3fn [M, K] and float32 scales [M, 1], one kernel:
                            per token (dynamic) each row's amax, scale = max(amax, 1e-12) / 448, x / scale
                            clamped and cast with round to nearest even; static, the checkpoint's one scale
                            (written to every row, so the matmul takes the same row-wise scale tensor)
    fp8_gemm                x_fp8 [M, K] @ weight [N, K]^T * scale_a [M, 1] * scale_b [N] (+ bias), for small M:
                            split-K so that a decode step's few rows still spread the weight read over every SM
                            (the slices' sums meet in the kernel: triton_splitk.py)

The division is IEEE (``div_rn``), so the quantized activations equal fp8.py's ``quantize_fp8_per_row``
bit for bit (the amax is exact in any dtype).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sluice.layers.quantization import triton_splitk
from sluice.layers.quantization.triton_splitk import TileConfig, decode_split_k, store_tile

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)
_QUANT_BLOCK = 4096  # columns per pass of the quantize kernel; rows up to this long are read once


@triton.jit(do_not_specialize=["K", "stride_xm", "stride_qm"])
def _quantize_fp8_kernel(x_ptr, q_ptr, scale_ptr, static_scale_ptr, K, stride_xm, stride_qm,
                         STATIC: tl.constexpr, FP8_MAX: tl.constexpr, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    cols = tl.arange(0, BLOCK)
    if STATIC:
        scale = tl.load(static_scale_ptr).to(tl.float32)
    elif ONE_BLOCK:
        x = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
        scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12), FP8_MAX)
    else:
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            x = tl.load(x_row + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.math.div_rn(tl.maximum(tl.max(amax, axis=0), 1e-12), FP8_MAX)
    tl.store(scale_ptr + row, scale)
    if ONE_BLOCK:
        if STATIC:
            x = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
        q = tl.clamp(tl.math.div_rn(x, scale), -FP8_MAX, FP8_MAX)
        tl.store(q_row + cols, q.to(q_ptr.dtype.element_ty), mask=cols < K)
    else:
        for k0 in range(0, K, BLOCK):
            x = tl.load(x_row + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
            q = tl.clamp(tl.math.div_rn(x, scale), -FP8_MAX, FP8_MAX)
            tl.store(q_row + k0 + cols, q.to(q_ptr.dtype.element_ty), mask=k0 + cols < K)


def quantize_activations(x: torch.Tensor, static_scale: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (float8 [M, K], float32 scales [M, 1]); ``static_scale`` (one value): the checkpoint's."""
    m, k = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty(m, k, dtype=FP8, device=x.device)
    scales = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scales
    block = min(triton.next_power_of_2(k), _QUANT_BLOCK)
    _quantize_fp8_kernel[(m,)](x, q, scales, scales if static_scale is None else static_scale, k, x.stride(0),
                               q.stride(0), STATIC=static_scale is not None, FP8_MAX=FP8_MAX, BLOCK=block,
                               ONE_BLOCK=k <= block, num_warps=4 if block <= 2048 else 8)
    return q, scales


Fp8GemmConfig = TileConfig


def default_gemm_config(m: int, n: int, k: int, device: torch.device) -> TileConfig:
    """Small M only (decode): the step streams the weight, so the grid must cover the SMs (split-K)."""
    # At most 32 rows a tile: with 64, Triton's fp8 dot runs as Hopper wgmma, whose fp8 accumulation keeps fewer
    # bits (measured on an H100: 6e-4 relative error against 1e-7 with 16 or 32 rows, same inputs).
    block_m = 16 if m <= 16 else 32
    block_n, block_k = 64, 128
    return TileConfig(block_m, block_n, block_k, decode_split_k(m, n, k, block_m, block_n, block_k, device))


@triton.jit(do_not_specialize=["M"])
def _fp8_gemm_kernel(a_ptr, b_ptr, scale_a_ptr, scale_b_ptr, bias_ptr, out_ptr, workspace_ptr, counter_ptr,
                     k_per_split, split_k, stride_os, stride_om, M, N, K, stride_am, stride_bn,
                     HAS_BIAS: tl.constexpr, REDUCE_IN_KERNEL: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    b_cols = b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + offs_k
        a = tl.load(a_rows + ks[None, :], mask=mask_m[:, None] & (ks < k_end)[None, :], other=0.0)
        b = tl.load(b_cols + ks[:, None], mask=(ks < k_end)[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, out_dtype=tl.float32)
    scale_a = tl.load(scale_a_ptr + offs_m, mask=mask_m, other=0.0)
    scale_b = tl.load(scale_b_ptr + offs_n, mask=mask_n, other=0.0)
    acc = acc * scale_a[:, None] * scale_b[None, :]  # per K slice: the scales distribute over the sum
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    store_tile(acc, out_ptr + pid_k * stride_os, stride_om, offs_m, offs_n, mask_m[:, None] & mask_n[None, :],
               workspace_ptr, counter_ptr, pid, split_k, N, REDUCE_IN_KERNEL)


def fp8_gemm(x_fp8: torch.Tensor, scale_a: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
             bias: torch.Tensor | None, out_dtype: torch.dtype, config: Fp8GemmConfig | None = None) -> torch.Tensor:
    """float8 x [M, K] (scales [M, 1]) times float8 weight [N, K] (scales [N]) -> [M, N] in ``out_dtype``."""
    m, k = x_fp8.shape
    n = weight.shape[0]
    # The kernel reads one scale per row at scale_a + row: a per-tensor scale expanded to [M, 1] (stride 0)
    # must become M values first.
    scale_a = scale_a.reshape(m).contiguous()
    config = config or default_gemm_config(m, n, k, x_fp8.device)
    launch = triton_splitk.plan_launch(m, n, k, config, out_dtype, x_fp8.device)
    _fp8_gemm_kernel[launch.grid](x_fp8, weight, scale_a, weight_scale, weight_scale if bias is None else bias,
                                  *launch.kernel_args(), m, n, k, x_fp8.stride(0), weight.stride(0),
                                  HAS_BIAS=bias is not None, REDUCE_IN_KERNEL=launch.reduce_in_kernel,
                                  BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                                  num_warps=config.num_warps, num_stages=config.num_stages)
    return launch.result(out_dtype)


def reserve_decode_workspace(device: torch.device, out_features: int, max_rows: int) -> None:
    """At load: the split-K workspace for this layer's calls of up to ``max_rows`` rows."""
    triton_splitk.reserve(device, max_rows * out_features, triton_splitk.num_tiles(max_rows, out_features, 16, 64))


@triton.jit(do_not_specialize=["M"])
def _scale_rows_cols_kernel(acc_ptr, scale_a_ptr, scale_b_ptr, bias_ptr, out_ptr, M, N, stride_am, stride_om,
                            HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    acc = tl.load(acc_ptr + row * stride_am + cols, mask=mask, other=0.0).to(tl.float32)
    out = acc * tl.load(scale_a_ptr + row) * tl.load(scale_b_ptr + cols, mask=mask, other=0.0)
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def scale_rows_cols(acc: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor, bias: torch.Tensor | None,
                    out_dtype: torch.dtype) -> torch.Tensor:
    """acc [M, N] (an unscaled float8 product) * scale_a [M, 1] * scale_b [N] (+ bias) -> ``out_dtype``, in one
    pass: the epilogue of a per-tensor ``_scaled_mm`` run with unit scales (fp8.py's ``tensorwise`` GEMM), which
    cuBLASLt serves at M <= 64 1.05-2.7x faster than torch's row-wise kernel (H100, L8's projections)."""
    m, n = acc.shape
    out = torch.empty(m, n, dtype=out_dtype, device=acc.device)
    if m == 0:
        return out
    scale_a = scale_a.reshape(m).contiguous()  # a static (per-tensor) scale arrives expanded to [M, 1] (stride 0)
    block_n = min(triton.next_power_of_2(n), 1024)
    _scale_rows_cols_kernel[(m, triton.cdiv(n, block_n))](acc, scale_a, scale_b, scale_b if bias is None else bias,
                                                          out, m, n, acc.stride(0), out.stride(0),
                                                          HAS_BIAS=bias is not None, BLOCK_N=block_n, num_warps=4)
    return out
