"""Triton kernels for the experts of a mixture-of-experts layer (``moe.FusedMoE`` on CUDA).

Each token picks ``k`` experts, so a step has T * k (token, expert) *slots*; slot s = t * k + j is
token t's j-th choice. The kernels group the slots by expert, then run one grouped GEMM per
projection over the experts' stacked weights, each program multiplying one expert's tile of rows:

    route       router logits [T, E] -> softmax, top-k, renormalize: topk_weights, topk_ids [T, k]
    align       topk_ids [T, k] -> sorted_slots: each expert's slots, padded to a multiple of BLOCK_M
                                   with the sentinel T * k; expert_ids: the expert of each BLOCK_M block
                  sorted_slots  [ e0 e0 e0 -- | e3 e3 e3 e3 e3 -- -- -- | e5 -- -- -- ]   (BLOCK_M 4)
                  expert_ids    [ 0           | 3          3            | 5           ]
    gate_up     h[s] = silu(x[s // k] @ w1[e]^T) * (x[s // k] @ w3[e]^T)      [T * k, I]  (one kernel)
    down        y[s] = h[s] @ w2[e]^T                                          [T * k, H]
    combine     out[t] = sum_j topk_weights[t, j] * y[t * k + j]               [T, H]  (float32 sum)

The results round to the model dtype where ``moe.experts_torch`` (the reference) does: gate and up
after their matmul, silu(gate), the product, the down projection; the weighted sum is float32.

Launches are CUDA-graph safe: grids come from T alone (an upper bound on the padded blocks; programs
past the real count, which only the device knows, return at once), nothing is read on the host,
and token counts are not specialized on. Alignment ranks slots within an expert by atomics, so the
order of rows inside an expert varies between runs; each row's result does not depend on it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ALIGN_BLOCK = 1024  # slots per program of the align kernels


@dataclass(frozen=True, slots=True)
class MoEKernelConfig:
    """Tile sizes of the grouped GEMMs (both projections use the same BLOCK_M: one alignment)."""
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


def default_config(num_slots: int, num_experts: int, element_size: int = 2) -> MoEKernelConfig:
    """Tiles by the mean rows per expert: decode steps give each expert a handful of rows (small
    BLOCK_M wastes less on padding; the step is bound by reading the weights), prefill gives many.
    Four-byte elements (float32) take half the K depth, so the pipelined tiles fit in shared memory.
    A starting point (benchmarks/moe_bench.py sweeps alternatives; at Q30A3's decode shapes it reads
    the experts at 0.9 of HBM bandwidth from 32 tokens on)."""
    rows_per_expert = num_slots / num_experts
    k_div = max(1, element_size // 2)
    if rows_per_expert <= 8:  # most experts get one block of 16 rows
        return MoEKernelConfig(block_m=16, block_n=64, block_k=128 // k_div, num_warps=4, num_stages=4)
    if rows_per_expert <= 32:  # one block of 32 rows: each expert's weights are read once, not twice
        return MoEKernelConfig(block_m=32, block_n=64, block_k=128 // k_div, num_warps=4, num_stages=4)
    return MoEKernelConfig(block_m=64, block_n=128, block_k=64 // k_div, num_warps=8, num_stages=4)


def can_fused_experts(hidden_states: torch.Tensor, w13_weight: torch.Tensor, w2_weight: torch.Tensor) -> bool:
    """CUDA tensors of one float dtype, contiguous: the layout the kernels index."""
    return (hidden_states.is_cuda and hidden_states.dtype in FLOAT_DTYPES and hidden_states.dim() == 2
            and w13_weight.dtype == w2_weight.dtype == hidden_states.dtype
            and w13_weight.device == hidden_states.device
            and hidden_states.stride(1) == 1 and w13_weight.is_contiguous() and w2_weight.is_contiguous())


# ---------------------------------------------------------------------------------------------
# Routing: softmax over the experts, top-k, renormalization, in one pass over the logits
# ---------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["num_tokens"])
def _route_kernel(logits_ptr, weights_ptr, ids_ptr, num_tokens, num_experts, stride_t,
                  TOP_K: tl.constexpr, TOP_K_PAD: tl.constexpr, EXPERTS_PAD: tl.constexpr,
                  BLOCK_T: tl.constexpr, RENORMALIZE: tl.constexpr, ROUND_WEIGHTS: tl.constexpr):
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.arange(0, EXPERTS_PAD)
    token_mask = tokens < num_tokens
    expert_mask = (experts < num_experts)[None, :]
    mask = token_mask[:, None] & expert_mask
    # padded experts get -inf (probability 0); padded tokens get zeros (finite, never stored)
    logits = tl.where(expert_mask, tl.load(logits_ptr + tokens[:, None] * stride_t + experts[None, :], mask=mask,
                                           other=0.0).to(tl.float32), -float("inf"))
    exps = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    probs = tl.where(mask, exps / tl.sum(exps, axis=1)[:, None], -1.0)  # padding never wins
    choices = tl.arange(0, TOP_K_PAD)
    top_weights = tl.zeros((BLOCK_T, TOP_K_PAD), dtype=tl.float32)
    top_ids = tl.zeros((BLOCK_T, TOP_K_PAD), dtype=tl.int32)
    for j in tl.static_range(TOP_K):  # the largest left, lowest index first among equals, as torch.topk
        best = tl.max(probs, axis=1)
        best_id = tl.min(tl.where(probs == best[:, None], experts[None, :], EXPERTS_PAD), axis=1)
        top_weights = tl.where(choices[None, :] == j, best[:, None], top_weights)
        top_ids = tl.where(choices[None, :] == j, best_id[:, None], top_ids)
        probs = tl.where(experts[None, :] == best_id[:, None], -1.0, probs)
    if RENORMALIZE:
        top_weights = top_weights / tl.sum(top_weights, axis=1)[:, None]
    if ROUND_WEIGHTS:
        top_weights = top_weights.to(logits_ptr.dtype.element_ty).to(tl.float32)
    out_mask = token_mask[:, None] & (choices < TOP_K)[None, :]
    offsets = tokens[:, None] * TOP_K + choices[None, :]
    tl.store(weights_ptr + offsets, top_weights, mask=out_mask)
    tl.store(ids_ptr + offsets, top_ids, mask=out_mask)


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool, round_weights: bool
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``moe.select_experts`` (``round_weights``: to the logits' dtype): router logits [T, E] ->
    (topk_weights [T, k] float32, topk_ids [T, k] int32), one launch."""
    num_tokens, num_experts = router_logits.shape
    if router_logits.stride(1) != 1:
        router_logits = router_logits.contiguous()
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=router_logits.device)
    if num_tokens:
        experts_pad = triton.next_power_of_2(num_experts)
        block_t = max(1, 2048 // experts_pad)
        _route_kernel[(triton.cdiv(num_tokens, block_t),)](
            router_logits, weights, ids, num_tokens, num_experts, router_logits.stride(0),
            TOP_K=top_k, TOP_K_PAD=triton.next_power_of_2(top_k), EXPERTS_PAD=experts_pad, BLOCK_T=block_t,
            RENORMALIZE=renormalize, ROUND_WEIGHTS=round_weights, num_warps=4)
    return weights, ids


# ---------------------------------------------------------------------------------------------
# Alignment: slots sorted by expert, each expert's run padded to a multiple of BLOCK_M
# ---------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["num_slots"])
def _count_kernel(topk_ids_ptr, counts_ptr, ranks_ptr, num_slots, BLOCK: tl.constexpr):
    # Each slot takes the next free rank of its expert; counts end up as the experts' histogram.
    slots = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = slots < num_slots
    experts = tl.load(topk_ids_ptr + slots, mask=mask, other=0)
    ranks = tl.atomic_add(counts_ptr + experts, 1, mask=mask)
    tl.store(ranks_ptr + slots, ranks, mask=mask)


@triton.jit(do_not_specialize=["num_slots", "max_padded", "max_blocks"])
def _offsets_kernel(counts_ptr, starts_ptr, expert_ids_ptr, num_padded_ptr, sorted_slots_ptr,
                    num_experts, num_slots, max_padded, max_blocks,
                    BLOCK_M: tl.constexpr, EXPERTS_PAD: tl.constexpr, BLOCK: tl.constexpr):
    # One program: padded runs' start offsets, each block's expert, the sentinel in every slot.
    experts = tl.arange(0, EXPERTS_PAD)
    expert_mask = experts < num_experts
    counts = tl.load(counts_ptr + experts, mask=expert_mask, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    tl.store(starts_ptr + experts, ends - padded, mask=expert_mask)
    tl.store(num_padded_ptr, tl.sum(padded, axis=0))
    for first in range(0, max_blocks, BLOCK // EXPERTS_PAD):
        blocks = first + tl.arange(0, BLOCK // EXPERTS_PAD)
        # a block's expert = how many experts' runs end at or before the block's first row
        ended = (ends[None, :] <= (blocks * BLOCK_M)[:, None]) & expert_mask[None, :]
        tl.store(expert_ids_ptr + blocks, tl.sum(ended.to(tl.int32), axis=1), mask=blocks < max_blocks)
    for first in range(0, max_padded, BLOCK):
        rows = first + tl.arange(0, BLOCK)
        tl.store(sorted_slots_ptr + rows, tl.zeros([BLOCK], dtype=tl.int32) + num_slots, mask=rows < max_padded)


@triton.jit(do_not_specialize=["num_slots"])
def _scatter_kernel(topk_ids_ptr, ranks_ptr, starts_ptr, sorted_slots_ptr, num_slots, BLOCK: tl.constexpr):
    slots = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = slots < num_slots
    experts = tl.load(topk_ids_ptr + slots, mask=mask, other=0)
    rows = tl.load(starts_ptr + experts, mask=mask, other=0) + tl.load(ranks_ptr + slots, mask=mask, other=0)
    tl.store(sorted_slots_ptr + rows, slots, mask=mask)


def max_padded_rows(num_slots: int, num_experts: int, block_m: int) -> int:
    """Rows the sorted slots can need: at most min(E, slots) experts are hit, each padding < BLOCK_M."""
    return num_slots + min(num_experts, num_slots) * (block_m - 1)


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] -> (sorted_slots [max_padded] int32, expert_ids [max_blocks] int32,
    num_padded [1] int32: the rows in use). Blocks at or past num_padded hold nothing."""
    num_slots = topk_ids.numel()
    max_padded = max_padded_rows(num_slots, num_experts, block_m)
    max_blocks = triton.cdiv(max_padded, block_m)
    device = topk_ids.device
    topk_ids = topk_ids.reshape(-1)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=device)
    ranks = torch.empty(num_slots, dtype=torch.int32, device=device)
    starts = torch.empty(num_experts, dtype=torch.int32, device=device)
    sorted_slots = torch.empty(max_padded, dtype=torch.int32, device=device)
    expert_ids = torch.empty(max_blocks, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    grid = (triton.cdiv(num_slots, _ALIGN_BLOCK),)
    _count_kernel[grid](topk_ids, counts, ranks, num_slots, BLOCK=_ALIGN_BLOCK)
    experts_pad = triton.next_power_of_2(num_experts)
    _offsets_kernel[(1,)](counts, starts, expert_ids, num_padded, sorted_slots, num_experts, num_slots,
                          max_padded, max_blocks, BLOCK_M=block_m, EXPERTS_PAD=experts_pad,
                          BLOCK=max(_ALIGN_BLOCK * 4, experts_pad), num_warps=4)
    _scatter_kernel[grid](topk_ids, ranks, starts, sorted_slots, num_slots, BLOCK=_ALIGN_BLOCK)
    return sorted_slots, expert_ids, num_padded


# ---------------------------------------------------------------------------------------------
# Grouped GEMM over the experts' stacked weights
# ---------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["num_slots"])
def _grouped_gemm_kernel(a_ptr, w_ptr, out_ptr, sorted_slots_ptr, expert_ids_ptr, num_padded_ptr,
                         num_slots, N, K, stride_am, stride_we, stride_wn, stride_om,
                         SLOTS_PER_A_ROW: tl.constexpr, GATED: tl.constexpr, EVEN_K: tl.constexpr,
                         PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[s, n] = a[s // SLOTS_PER_A_ROW] . w[e, n] for the slots s of one block (expert e).

    GATED: w holds [gate (N rows) | up (N rows)] and out = silu(a . gate) * (a . up).
    """
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = tl.program_id(0) // num_n_blocks, tl.program_id(0) % num_n_blocks
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    slots = tl.load(sorted_slots_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    slot_mask = slots < num_slots
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    a_rows = (slots // SLOTS_PER_A_ROW).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Columns past N wrap around (loads stay in bounds without a mask); their results are not stored.
    w_cols = (offs_n % N).to(tl.int64)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]
    w_ptrs = w_ptr + expert * stride_we + w_cols[None, :] * stride_wn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=slot_mask[:, None], other=0.0)
            w = tl.load(w_ptrs)
        else:
            k_mask = offs_k < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=slot_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        if GATED:
            if EVEN_K:
                w_up = tl.load(w_ptrs + N * stride_wn)
            else:
                w_up = tl.load(w_ptrs + N * stride_wn, mask=k_mask[:, None], other=0.0)
            acc_up = tl.dot(a, w_up, acc_up, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    dtype = out_ptr.dtype.element_ty
    if GATED:
        # as torch: gate and up round to the dtype, then silu(gate) rounds, then the product
        gate = acc.to(dtype).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        result = silu * acc_up.to(dtype).to(tl.float32)
    else:
        result = acc
    out_ptrs = out_ptr + slots.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, result.to(dtype), mask=slot_mask[:, None] & (offs_n < N)[None, :])


def _grouped_gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, aligned: tuple, num_slots: int,
                  slots_per_a_row: int, gated: bool, config: MoEKernelConfig) -> None:
    sorted_slots, expert_ids, num_padded = aligned
    n = out.shape[1]
    k = a.shape[1]
    grid = (expert_ids.shape[0] * triton.cdiv(n, config.block_n),)
    _grouped_gemm_kernel[grid](
        a, w, out, sorted_slots, expert_ids, num_padded, num_slots, n, k,
        a.stride(0), w.stride(0), w.stride(1), out.stride(0),
        SLOTS_PER_A_ROW=slots_per_a_row, GATED=gated, EVEN_K=k % config.block_k == 0,
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32",  # float32 stays exact; 16-bit ignores it
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages)


# ---------------------------------------------------------------------------------------------
# Weighted combine of each token's k expert outputs
# ---------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["num_tokens"])
def _combine_kernel(y_ptr, weights_ptr, out_ptr, num_tokens, H,
                    TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    token_mask = tokens < num_tokens
    mask = token_mask[:, None] & (cols < H)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        weight = tl.load(weights_ptr + tokens * TOP_K + j, mask=token_mask, other=0.0)
        y = tl.load(y_ptr + (tokens * TOP_K + j)[:, None] * H + cols[None, :], mask=mask, other=0.0)
        acc += weight[:, None] * y.to(tl.float32)
    tl.store(out_ptr + tokens[:, None] * H + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def _combine(y: torch.Tensor, topk_weights: torch.Tensor, out: torch.Tensor, top_k: int) -> None:
    num_tokens, hidden = out.shape
    block_h = min(triton.next_power_of_2(hidden), 1024)
    block_t = max(1, 2048 // block_h)
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(hidden, block_h))
    _combine_kernel[grid](y, topk_weights, out, num_tokens, hidden, TOP_K=top_k, BLOCK_T=block_t,
                          BLOCK_H=block_h, num_warps=4)


def fused_experts(hidden_states: torch.Tensor, w13_weight: torch.Tensor, w2_weight: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                  config: MoEKernelConfig | None = None) -> torch.Tensor:
    """As ``moe.experts_torch``: hidden [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_weights (float32) and
    topk_ids [T, k] -> [T, H] in hidden's dtype."""
    num_tokens, hidden = hidden_states.shape
    num_experts, two_i, _ = w13_weight.shape
    top_k = topk_ids.shape[1]
    num_slots = num_tokens * top_k
    out = torch.empty_like(hidden_states)
    if num_tokens == 0:
        return out
    config = config or default_config(num_slots, num_experts, hidden_states.element_size())
    aligned = align_by_expert(topk_ids, num_experts, config.block_m)
    intermediate = torch.empty(num_slots, two_i // 2, dtype=hidden_states.dtype, device=hidden_states.device)
    _grouped_gemm(hidden_states, w13_weight, intermediate, aligned, num_slots, top_k, True, config)
    expert_out = torch.empty(num_slots, hidden, dtype=hidden_states.dtype, device=hidden_states.device)
    _grouped_gemm(intermediate, w2_weight, expert_out, aligned, num_slots, 1, False, config)
    _combine(expert_out, topk_weights.to(torch.float32).contiguous(), out, top_k)
    return out
