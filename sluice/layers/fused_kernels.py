"""Triton kernels for the elementwise work of a decoder layer, one launch each where torch takes many:

    rms_norm            x (+ residual) -> normed (, x + residual)    one read of x and residual
    apply_rotary_       q, k rotated in place at their positions     cos/sin computed in the kernel
    silu_and_mul        [T, 2d] = [gate | up] -> silu(gate) * up      one read, one write

Each kernel reproduces the rounding steps of the torch code in norm.py, rotary.py and
activation.py (the reference), computing in float32 and rounding to the model dtype exactly where
the torch code does, so the two paths differ only by float32 reduction order and libm ulps.

Launches are CUDA-graph safe: grids and block sizes come from shapes alone, nothing reads device
values on the host. Row and token counts are not specialized on (``do_not_specialize``): Triton
would compile a new variant the first time a step's count is 1 or a multiple of 16, stalling that
step. The layers use these kernels for CUDA tensors (``runs_on``) in the shapes each ``can_*``
check accepts, and keep their torch code everywhere else.

q and k arrive as column slices of the fused qkv projection, so their rows are strided:

    qkv row t: [ q: H * D | k: Hkv * D | v: Hkv * D ]    q[t, h * D + d] at t * stride_q + h * D + d
    one head:  [ x1: rotary_dim / 2 | x2: rotary_dim / 2 | passthrough: D - rotary_dim ]
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Widest row one norm program holds in registers without spilling on sm_90; wider rows keep the torch code.
MAX_NORM_WIDTH = 16384
# Elements per program for the row-tiled kernels: several short rows share a program, long rows get
# one each. A starting point, not tuned on hardware (benchmarks/layer_bench.py measures).
TILE_ELEMENTS = 2048
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def runs_on(x: torch.Tensor) -> bool:
    """Whether the fused kernels serve this tensor: CUDA only. CPU keeps the torch code, the
    reference that the CPU tests and the Hugging Face equivalence checks trust."""
    return x.is_cuda


def _num_warps(tile_elements: int) -> int:
    return min(16, max(4, tile_elements // 512))


def _rows_per_program(row_elements: int) -> int:
    """Rows of ``row_elements`` (a power of 2) per program: a power of 2, at least 1."""
    rows = max(1, TILE_ELEMENTS // row_elements)
    return 1 << (rows.bit_length() - 1)


# ---------------------------------------------------------------------------------------------
# RMSNorm, with the residual add fused in
# ---------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["num_rows"])
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, new_residual_ptr,
                     num_rows, inner_rows, stride_x0, stride_x1, stride_r0, stride_r1, eps,
                     WIDTH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                     HAS_RESIDUAL: tl.constexpr):
    # Rows of x are [outer, inner] (2-D inputs have inner_rows == 1; Qwen3's per-head norms
    # see [T, heads]); outputs are contiguous [num_rows, WIDTH].
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < num_rows)[:, None] & (cols < WIDTH)[None, :]
    outer, inner = rows // inner_rows, rows % inner_rows
    out_offsets = rows[:, None] * WIDTH + cols[None, :]
    x = tl.load(x_ptr + (outer * stride_x0 + inner * stride_x1)[:, None] + cols[None, :],
                mask=mask, other=0.0).to(tl.float32)
    # Without a residual, new_residual_ptr is x itself: its dtype is the "input dtype" either way.
    input_dtype = new_residual_ptr.dtype.element_ty
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + (outer * stride_r0 + inner * stride_r1)[:, None] + cols[None, :],
                           mask=mask, other=0.0).to(tl.float32)
        # torch rounds x + residual to the input dtype before normalizing it
        x = (x + residual).to(input_dtype)
        tl.store(new_residual_ptr + out_offsets, x, mask=mask)
        x = x.to(tl.float32)
    variance = tl.sum(x * x, axis=1) / WIDTH
    normed = (x * tl.rsqrt(variance + eps)[:, None]).to(input_dtype).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=cols < WIDTH, other=0.0).to(tl.float32)
    tl.store(out_ptr + out_offsets, (normed * weight[None, :]).to(out_ptr.dtype.element_ty), mask=mask)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """A [outer, inner, width] view of x (a copy only for 4-D and up)."""
    if x.dim() == 1:
        return x.view(1, 1, -1)
    if x.dim() == 2:
        return x.unsqueeze(1)
    return x if x.dim() == 3 else x.reshape(-1, x.shape[-2], x.shape[-1])


def can_rms_norm(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> bool:
    if not runs_on(x) or x.dtype not in FLOAT_DTYPES or x.dim() == 0 or x.stride(-1) != 1:
        return False
    if not (0 < x.shape[-1] <= MAX_NORM_WIDTH and weight.shape == (x.shape[-1],) and weight.is_contiguous()
            and weight.device == x.device):
        return False
    return residual is None or (residual.shape == x.shape and residual.dtype in FLOAT_DTYPES
                                and residual.stride(-1) == 1 and residual.device == x.device)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """As RMSNorm.forward: ``normed`` or, with a residual, ``(normed, x + residual)``; new tensors."""
    input_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, input_dtype), device=x.device)
    new_residual = None if residual is None else torch.empty(x.shape, dtype=input_dtype, device=x.device)
    rows_x = _as_rows(x)
    rows_r = rows_x if residual is None else _as_rows(residual)
    num_rows, width = rows_x.shape[0] * rows_x.shape[1], x.shape[-1]
    if num_rows:
        block_n = triton.next_power_of_2(width)
        block_rows = _rows_per_program(block_n)
        _rms_norm_kernel[(triton.cdiv(num_rows, block_rows),)](
            rows_x, rows_r, weight, out, rows_x if new_residual is None else new_residual,
            num_rows, rows_x.shape[1], rows_x.stride(0), rows_x.stride(1), rows_r.stride(0), rows_r.stride(1),
            eps, WIDTH=width, BLOCK_N=block_n, BLOCK_ROWS=block_rows, HAS_RESIDUAL=residual is not None,
            num_warps=_num_warps(block_n * block_rows))
    return out if new_residual is None else (out, new_residual)


# ---------------------------------------------------------------------------------------------
# Rotary embedding (neox: the two halves of each head's rotary part), in place
# ---------------------------------------------------------------------------------------------

@triton.jit
def _rotate_heads(x_ptr, tokens, token_mask, stride_t, first_head, num_heads, cos, sin,
                  HEAD_DIM: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rotates heads [first_head, first_head + BLOCK_H) of rows ``tokens``: a [tokens, heads, half] tile."""
    heads = first_head + tl.arange(0, BLOCK_H)
    offs = tl.arange(0, HALF_PAD)
    mask = token_mask[:, None, None] & (heads < num_heads)[None, :, None] & (offs < HALF)[None, None, :]
    x1_ptrs = x_ptr + tokens[:, None, None] * stride_t + heads[None, :, None] * HEAD_DIM + offs[None, None, :]
    x1 = tl.load(x1_ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x1_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    # torch computes x1 * cos - x2 * sin in the model dtype: every product and sum is rounded.
    dtype = x_ptr.dtype.element_ty
    cos = cos.to(dtype).to(tl.float32)[:, None, :]
    sin = sin.to(dtype).to(tl.float32)[:, None, :]
    x1_cos, x2_sin = (x1 * cos).to(dtype).to(tl.float32), (x2 * sin).to(dtype).to(tl.float32)
    x2_cos, x1_sin = (x2 * cos).to(dtype).to(tl.float32), (x1 * sin).to(dtype).to(tl.float32)
    tl.store(x1_ptrs, (x1_cos - x2_sin).to(dtype), mask=mask)
    tl.store(x1_ptrs + HALF, (x2_cos + x1_sin).to(dtype), mask=mask)


@triton.jit(do_not_specialize=["num_tokens"])
def _rotary_kernel(q_ptr, k_ptr, positions_ptr, inv_freq_ptr, num_tokens, stride_q, stride_k, stride_pos,
                   num_q_heads, num_k_heads, num_q_blocks,
                   HEAD_DIM: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    # grid: (token block, head block); head blocks [0, num_q_blocks) cover q's heads, the rest k's.
    # cos/sin are computed once per token and shared by all heads of the tile.
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_mask = tokens < num_tokens
    head_block = tl.program_id(1)
    offs = tl.arange(0, HALF_PAD)
    inv_freq = tl.load(inv_freq_ptr + offs, mask=offs < HALF, other=0.0).to(tl.float32)
    positions = tl.load(positions_ptr + tokens * stride_pos, mask=token_mask, other=0).to(tl.float32)
    freqs = positions[:, None] * inv_freq[None, :]
    cos, sin = tl.cos(freqs), tl.sin(freqs)
    if head_block < num_q_blocks:
        _rotate_heads(q_ptr, tokens, token_mask, stride_q, head_block * BLOCK_H, num_q_heads, cos, sin,
                      HEAD_DIM, HALF, HALF_PAD, BLOCK_H)
    else:
        _rotate_heads(k_ptr, tokens, token_mask, stride_k, (head_block - num_q_blocks) * BLOCK_H, num_k_heads,
                      cos, sin, HEAD_DIM, HALF, HALF_PAD, BLOCK_H)


def can_apply_rotary(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                     inv_freq: torch.Tensor, head_dim: int, rotary_dim: int) -> bool:
    if not runs_on(query) or query.dtype not in FLOAT_DTYPES or key.dtype != query.dtype:
        return False
    if query.dim() != 2 or key.dim() != 2 or positions.dim() != 1:
        return False
    if not (positions.shape[0] == query.shape[0] == key.shape[0] and query.stride(1) == 1 and key.stride(1) == 1):
        return False
    heads_fit = query.shape[1] % head_dim == 0 and key.shape[1] % head_dim == 0
    same_device = positions.device == inv_freq.device == key.device == query.device
    return (heads_fit and same_device and 0 < rotary_dim <= head_dim and rotary_dim % 2 == 0
            and inv_freq.shape == (rotary_dim // 2,) and inv_freq.is_contiguous())


def apply_rotary_(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, inv_freq: torch.Tensor,
                  head_dim: int, rotary_dim: int) -> None:
    """Rotates the first ``rotary_dim`` dims of every head of query [T, H * D] and key [T, Hkv * D]
    in place, at angles positions [T] x inv_freq [rotary_dim / 2] (float32)."""
    num_tokens = query.shape[0]
    if num_tokens == 0:
        return
    num_q_heads, num_k_heads = query.shape[1] // head_dim, key.shape[1] // head_dim
    half = rotary_dim // 2
    half_pad = triton.next_power_of_2(half)
    head_elements = 2 * half_pad
    block_h = min(triton.next_power_of_2(max(num_q_heads, num_k_heads)), _rows_per_program(head_elements))
    block_t = _rows_per_program(head_elements * block_h)
    num_q_blocks = triton.cdiv(num_q_heads, block_h)
    grid = (triton.cdiv(num_tokens, block_t), num_q_blocks + triton.cdiv(num_k_heads, block_h))
    _rotary_kernel[grid](query, key, positions, inv_freq, num_tokens, query.stride(0), key.stride(0),
                         positions.stride(0), num_q_heads, num_k_heads, num_q_blocks,
                         HEAD_DIM=head_dim, HALF=half, HALF_PAD=half_pad, BLOCK_T=block_t, BLOCK_H=block_h,
                         num_warps=_num_warps(block_t * block_h * head_elements))


# ---------------------------------------------------------------------------------------------
# silu(gate) * up
# ---------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["num_rows"])
def _silu_and_mul_kernel(x_ptr, out_ptr, num_rows, width, stride_x,
                         BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows < num_rows)[:, None] & (cols < width)[None, :]
    gate_ptrs = x_ptr + rows[:, None] * stride_x + cols[None, :]
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptrs + width, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    # torch rounds silu(gate) to the model dtype before the multiply
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * width + cols[None, :], (silu * up).to(dtype), mask=mask)


def can_silu_and_mul(x: torch.Tensor) -> bool:
    return (runs_on(x) and x.dtype in FLOAT_DTYPES and x.dim() >= 1 and x.shape[-1] % 2 == 0
            and x.stride(-1) == 1)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2 * d] laid out as [gate | up] -> silu(gate) * up [..., d], a new tensor."""
    width = x.shape[-1] // 2
    out = torch.empty(x.shape[:-1] + (width,), dtype=x.dtype, device=x.device)
    rows = x.reshape(-1, x.shape[-1])  # a view for every layout the projections produce
    if rows.shape[0] and width:
        block_d = min(triton.next_power_of_2(width), 1024)
        block_rows = _rows_per_program(block_d)
        grid = (triton.cdiv(rows.shape[0], block_rows), triton.cdiv(width, block_d))
        _silu_and_mul_kernel[grid](rows, out, rows.shape[0], width, rows.stride(0),
                                   BLOCK_ROWS=block_rows, BLOCK_D=block_d,
                                   num_warps=_num_warps(block_rows * block_d))
    return out
