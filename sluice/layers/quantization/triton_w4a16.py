"""Triton GEMM for weight-only integer layers (W4A16, and 8-bit GPTQ): y = x W^T with W dequantized in registers.

Every format (AWQ, GPTQ with or without act-order, compressed-tensors pack-quantized) is repacked once at load
from w4a16.py's canonical form into one kernel layout:

    qweight  int32 [K / P, N]   P = 32 / bits codes per word, packed along K, lowest bits first:
                                word [r, n] holds W[n, r*P .. r*P + P - 1]; N is contiguous (coalesced loads)
    scales   dtype [G, N]       group g covers input rows g*group_size .. (g+1)*group_size - 1
    zeros    dtype [G, N]       zero point in code units (symmetric formats: 2^(bits-1) everywhere)
    perm     long  [K] | None   act-order: the input channels sorted by group, so every group is contiguous;
                                the activations are gathered x[:, perm] before the kernel

Each program computes a [BLOCK_M, BLOCK_N] tile of y over one K range: it loads BLOCK_K / P packed rows,
shifts them into [BLOCK_K, BLOCK_N] codes, dequantizes (code - zero) * scale to the activation dtype and
accumulates ``tl.dot`` in float32. The dequantized weight equals the reference's (float32 math rounded
once to the 16-bit dtype) in every mode; the modes differ in instruction count, which matters at decode,
where the kernel must dequantize K * N values in the time HBM takes to deliver K * N / 2 bytes:

    half      (default for 4-bit bf16/fp16) 16-bit math; the code ORed into the mantissa of 128.0 (bf16) or
              1024.0 (fp16) is that value plus the code, so no int -> float conversion (16 per clock per SM)
    magic32   float32 math, the code ORed into 2^23; one conversion to the 16-bit dtype at the end
    f32       int -> float32 conversion, float32 math

    decode (M <= 64)    BLOCK_M 16-64, split-K: the step reads the weights once, so the grid must cover the SMs
                        even when N / BLOCK_N is small; the K slices' float32 sums meet in the kernel
                        (triton_splitk.py)
    prefill             BLOCK_M 64-128, BLOCK_N 128, no split; from DENSE_MIN_M rows (1024) the weight is
                        dequantized by a Triton kernel into a temporary dense [K, N] for torch.matmul

The dequantize-then-matmul torch path of w4a16.py stays the reference (and the CPU path).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sluice.layers.quantization import triton_splitk
from sluice.layers.quantization.triton_splitk import TileConfig, decode_split_k, store_tile

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DECODE_MAX_M = 64  # up to this many rows the default tiles split K
CONFIG_OVERRIDE = os.environ.get("SLUICE_W4A16_CONFIG")  # read once: default_config runs for every call
DENSE_MIN_M = int(os.environ.get("SLUICE_W4A16_DENSE_MIN_M", "1024"))  # rows from which dequantize + matmul


@dataclass(frozen=True, slots=True)
class W4A16KernelConfig(TileConfig):
    dequant: str = "auto"  # half (16-bit math; auto's choice where exact) | magic32 | f32 (float32 math)
    unpack: str = "reshape"  # reshape (each packed word loaded once) | gather (each row loads its word)


@dataclass(slots=True)
class PackedWeight:
    """A layer's weight in the kernel layout (see the module docstring)."""
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    perm: torch.Tensor | None
    bits: int
    group_size: int  # rows per group in the (permuted) K order; K itself for one group per channel
    in_features: int
    out_features: int


def pack_along_k(codes_kn: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [K, N] -> int32 [K / P, N], P = 32 / bits, code k*P + j in bits j*bits.. of word k.

    In int32 throughout, one slot at a time (a large layer's codes widened to int64 would take gigabytes):
    the top slot is added as a signed value times 2^(32 - bits), which sets the same bits without overflow."""
    per_word = 32 // bits
    rows, cols = codes_kn.shape
    if rows % per_word:
        raise ValueError(f"{rows} input features are not a multiple of {per_word} ({bits}-bit codes per int32)")
    slots = codes_kn.view(rows // per_word, per_word, cols)
    words = torch.zeros(rows // per_word, cols, dtype=torch.int32, device=codes_kn.device)
    for j in range(per_word - 1):
        words |= slots[:, j].to(torch.int32) << (j * bits)
    top = slots[:, -1].to(torch.int32)
    top = torch.where(top >= 1 << (bits - 1), top - (1 << bits), top)
    return words + top * (1 << (32 - bits))


def pack_canonical(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int,
                   dtype: torch.dtype) -> PackedWeight | None:
    """w4a16.py's canonical form (codes [N, K], zeros/scales [N, G], g_idx [K]) -> the kernel layout.

    None when the groups are not all the same size (a g_idx no GPTQ writes): the caller keeps the torch path."""
    out_features, in_features = codes.shape
    num_groups = scales.shape[1]
    if in_features % num_groups:
        return None
    group_size = in_features // num_groups
    g_idx = g_idx.to(codes.device).long()
    perm = None
    if not torch.equal(g_idx, torch.arange(in_features, device=g_idx.device) // group_size):
        perm = torch.argsort(g_idx, stable=True)
        if not torch.equal(g_idx[perm], torch.arange(in_features, device=g_idx.device) // group_size):
            return None
        codes = codes[:, perm]
    return PackedWeight(qweight=pack_along_k(codes.t().contiguous(), bits).contiguous(),
                        scales=scales.t().to(dtype).contiguous(), zeros=zeros.t().to(dtype).contiguous(),
                        perm=perm, bits=bits, group_size=group_size, in_features=in_features,
                        out_features=out_features)


def default_config(m: int, n: int, k: int, device: torch.device) -> W4A16KernelConfig:
    """Tiles by the number of rows. Decode is bound by reading the weights (K * N / 2 bytes): small BLOCK_M and
    enough programs (split-K) to keep every SM streaming. Prefill is bound by the dot: large tiles.
    ``SLUICE_W4A16_CONFIG=block_m,block_n,block_k,split_k,num_warps,num_stages[,reduce[,dequant[,unpack]]]`` overrides
    (what benchmarks/quant_kernel_bench.py --sweep finds)."""
    if CONFIG_OVERRIDE:
        values = CONFIG_OVERRIDE.split(",")
        return W4A16KernelConfig(*(int(v) for v in values[:6]), *values[6:])
    if m <= 16:
        block_m, block_n, block_k, warps, stages = 16, 64, 128, 4, 4
    elif m <= 64:
        block_m, block_n, block_k, warps, stages = 32 if m <= 32 else 64, 64, 128, 4, 4
    else:
        block_m, block_n, block_k, warps, stages = (64, 128, 64, 4, 4) if m <= 256 else (128, 128, 64, 8, 3)
    split_k = decode_split_k(m, n, k, block_m, block_n, block_k, device) if m <= DECODE_MAX_M else 1
    return W4A16KernelConfig(block_m, block_n, block_k, split_k, warps, stages)


@triton.jit
def _dequantize_tile(qweight_ptr, scales_ptr, zeros_ptr, k0, k_end, K, offs_n, mask_n, stride_qk, stride_sg,
                     dtype_ptr, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, DEQUANT: tl.constexpr,
                     UNPACK: tl.constexpr, MAGIC_BITS: tl.constexpr, MAGIC_VALUE: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """W[k0 : k0 + BLOCK_K, offs_n] (rows from k_end on: zero codes) in the element type of ``dtype_ptr``."""
    PER_WORD: tl.constexpr = 32 // BITS
    CODE_MASK: tl.constexpr = (1 << BITS) - 1
    # One group per K step when the step lies inside a group: one row of scales and zeros per step.
    GROUP_PER_STEP: tl.constexpr = GROUP_SIZE % BLOCK_K == 0
    dtype = dtype_ptr.dtype.element_ty
    ks = k0 + tl.arange(0, BLOCK_K)
    if UNPACK == "gather":  # every row loads its own word (P rows share one, served by L1)
        packed = tl.load(qweight_ptr + (ks // PER_WORD).to(tl.int64)[:, None] * stride_qk + offs_n[None, :],
                         mask=(ks < K)[:, None] & mask_n[None, :], other=0)
        codes = (packed >> ((ks % PER_WORD) * BITS)[:, None]) & CODE_MASK
    else:  # "reshape": each word loaded once, shifted into P rows
        words = k0 // PER_WORD + tl.arange(0, BLOCK_K // PER_WORD)
        packed = tl.load(qweight_ptr + words.to(tl.int64)[:, None] * stride_qk + offs_n[None, :],
                         mask=(words < K // PER_WORD)[:, None] & mask_n[None, :], other=0)
        shifts = tl.arange(0, PER_WORD) * BITS
        codes = (packed[:, None, :] >> shifts[None, :, None]) & CODE_MASK  # [BLOCK_K / P, P, BLOCK_N]
        codes = tl.reshape(codes, (BLOCK_K, BLOCK_N))
    if GROUP_PER_STEP:
        group_ptrs = (k0 // GROUP_SIZE) * stride_sg + offs_n[None, :]
        group_mask = mask_n[None, :]
    else:
        group_ptrs = (ks // GROUP_SIZE)[:, None] * stride_sg + offs_n[None, :]
        group_mask = (ks < k_end)[:, None] & mask_n[None, :]
    scales = tl.load(scales_ptr + group_ptrs, mask=group_mask, other=0.0)
    zeros = tl.load(zeros_ptr + group_ptrs, mask=group_mask, other=0.0)
    if DEQUANT == "half":
        # 16-bit math, exact as the reference's: the code's bits under MAGIC_BITS read as MAGIC_VALUE + code
        # (bf16 128 + c, fp16 1024 + c); minus (MAGIC_VALUE + zero) is the exact integer c - zero, and the
        # product with the scale rounds once, as float32 math rounded to the 16-bit dtype does.
        magic = (codes | MAGIC_BITS).to(tl.int16).to(dtype, bitcast=True)
        weight = ((magic - (zeros + MAGIC_VALUE).to(dtype)) * scales).to(dtype)
    elif DEQUANT == "magic32":  # float32 math; 2^23 + code from the bits, no int -> float conversion
        magic = (codes | 0x4B000000).to(tl.float32, bitcast=True)
        weight = ((magic - (zeros.to(tl.float32) + 8388608.0)) * scales.to(tl.float32)).to(dtype)
    else:  # "f32"
        weight = ((codes.to(tl.float32) - zeros.to(tl.float32)) * scales.to(tl.float32)).to(dtype)
    return weight


@triton.jit(do_not_specialize=["M"])
def _w4a16_gemm_kernel(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr, workspace_ptr, counter_ptr,
                       k_per_split, split_k, stride_os, stride_om, M, N, K, stride_xm, stride_qk, stride_sg,
                       REDUCE_IN_KERNEL: tl.constexpr,
                       BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       DEQUANT: tl.constexpr, UNPACK: tl.constexpr, MAGIC_BITS: tl.constexpr,
                       MAGIC_VALUE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + offs_k
        a = tl.load(x_rows + ks[None, :], mask=mask_m[:, None] & (ks < k_end)[None, :], other=0.0)
        weight = _dequantize_tile(qweight_ptr, scales_ptr, zeros_ptr, k0, k_end, K, offs_n, mask_n, stride_qk,
                                  stride_sg, x_ptr, BITS, GROUP_SIZE, DEQUANT, UNPACK, MAGIC_BITS, MAGIC_VALUE,
                                  BLOCK_K, BLOCK_N)
        acc = tl.dot(a, weight, acc, input_precision=DOT_PRECISION, out_dtype=tl.float32)
    if HAS_BIAS:
        if pid_k == 0:  # once per tile: the K slices' sums add up
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    store_tile(acc, out_ptr + pid_k * stride_os, stride_om, offs_m, offs_n, mask_m[:, None] & mask_n[None, :],
               workspace_ptr, counter_ptr, pid, split_k, N, REDUCE_IN_KERNEL)


@triton.jit
def _w4a16_dequantize_kernel(qweight_ptr, scales_ptr, zeros_ptr, out_ptr, N, K, stride_qk, stride_sg, stride_ok,
                             BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, DEQUANT: tl.constexpr,
                             UNPACK: tl.constexpr, MAGIC_BITS: tl.constexpr, MAGIC_VALUE: tl.constexpr,
                             BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    k0 = tl.program_id(0) * BLOCK_K
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    weight = _dequantize_tile(qweight_ptr, scales_ptr, zeros_ptr, k0, K, K, offs_n, mask_n, stride_qk, stride_sg,
                              out_ptr, BITS, GROUP_SIZE, DEQUANT, UNPACK, MAGIC_BITS, MAGIC_VALUE, BLOCK_K, BLOCK_N)
    ks = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + ks.to(tl.int64)[:, None] * stride_ok + offs_n[None, :], weight,
             mask=(ks < K)[:, None] & mask_n[None, :])


# 16-bit dequantization: (bits of the 16-bit value with the code in its low mantissa bits, that value at code 0)
_HALF_MAGIC = {torch.bfloat16: (0x4300, 128.0), torch.float16: (0x6400, 1024.0)}


def _dequant_mode(requested: str, x_dtype: torch.dtype, weight: PackedWeight) -> str:
    """``half`` needs 16-bit activations, scales of the same dtype and codes below the magic value's ulp range."""
    half_ok = (x_dtype in _HALF_MAGIC and weight.scales.dtype == x_dtype
               and (1 << weight.bits) <= {torch.bfloat16: 128, torch.float16: 1024}.get(x_dtype, 0))
    if requested == "auto":
        return "half" if half_ok else "magic32"
    if requested == "half" and not half_ok:
        return "magic32"
    return requested


def w4a16_dequantize(weight: PackedWeight, dtype: torch.dtype, dequant: str = "auto") -> torch.Tensor:
    """The dense weight transposed, [K, N] in ``dtype`` (input channels in kernel order: permuted by act-order)."""
    k, n = weight.in_features, weight.out_features
    out = torch.empty(k, n, dtype=dtype, device=weight.qweight.device)
    block_k, block_n = 64, 128
    magic_bits, magic_value = _HALF_MAGIC.get(dtype, (0, 0.0))
    _w4a16_dequantize_kernel[(triton.cdiv(k, block_k), triton.cdiv(n, block_n))](
        weight.qweight, weight.scales, weight.zeros, out, n, k, weight.qweight.stride(0), weight.scales.stride(0),
        out.stride(0), BITS=weight.bits, GROUP_SIZE=weight.group_size, DEQUANT=_dequant_mode(dequant, dtype, weight),
        UNPACK="reshape", MAGIC_BITS=magic_bits, MAGIC_VALUE=magic_value, BLOCK_K=block_k, BLOCK_N=block_n)
    return out


def w4a16_gemm(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None,
               config: W4A16KernelConfig | None = None, dense_min_m: int | None = None) -> torch.Tensor:
    """x [..., K] (float16/bfloat16/float32) -> [..., N] in x's dtype.

    From ``dense_min_m`` rows on (default DENSE_MIN_M) the weight is dequantized into a temporary dense
    [K, N] and multiplied by torch.matmul: a long prefill is bound by the matmul, where the fused kernel
    would dequantize every weight tile once per BLOCK_M rows."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if weight.perm is not None:
        x2 = x2.index_select(1, weight.perm)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, k, n = x2.shape[0], weight.in_features, weight.out_features
    if m == 0:
        return x.new_empty(*shape[:-1], n)
    if m >= (DENSE_MIN_M if dense_min_m is None else dense_min_m) and config is None:
        out = torch.matmul(x2, w4a16_dequantize(weight, x.dtype))
        if bias is not None:
            out += bias
        return out.reshape(*shape[:-1], n)
    config = config or default_config(m, n, k, x.device)
    launch = triton_splitk.plan_launch(m, n, k, config, x.dtype, x.device)
    dequant = _dequant_mode(config.dequant, x.dtype, weight)
    magic_bits, magic_value = _HALF_MAGIC.get(x.dtype, (0, 0.0))
    _w4a16_gemm_kernel[launch.grid](
        x2, weight.qweight, weight.scales, weight.zeros, x2 if bias is None else bias, *launch.kernel_args(),
        m, n, k, x2.stride(0), weight.qweight.stride(0), weight.scales.stride(0),
        REDUCE_IN_KERNEL=launch.reduce_in_kernel, BITS=weight.bits, GROUP_SIZE=weight.group_size,
        HAS_BIAS=bias is not None, DEQUANT=dequant, UNPACK=config.unpack, MAGIC_BITS=magic_bits,
        MAGIC_VALUE=magic_value, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # no TF32 rounding
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        # float32 activations take twice the shared memory per stage: at most two stages fit the H100's 227 KiB
        num_warps=config.num_warps, num_stages=config.num_stages if x.element_size() < 4 else min(config.num_stages, 2))
    return launch.result(x.dtype).reshape(*shape[:-1], n)


def reserve_decode_workspace(device: torch.device, out_features: int) -> None:
    """At load: the split-K workspace for this layer's decode-sized calls (up to 64 rows, any default tiles)."""
    triton_splitk.reserve(device, DECODE_MAX_M * out_features, triton_splitk.num_tiles(DECODE_MAX_M, out_features,
                                                                                       16, 32))
