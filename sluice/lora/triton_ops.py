"""Triton LoRA kernels (the CUDA path): shrink ``xa = x A[s]^T`` and expand ``out += xa B[s]^T`` for every
sub-projection of a fused layer in one launch each. ``layers.apply_lora`` (torch) is the CPU path and the
reference the tests compare against.

A layer's weights are stacked (see ``LoRASlotWeights``): A [subs, slots, r_max, in] and B [slots, out, r_max],
B's rows the fused output columns, so sub-projection i writes columns ``offsets[i] : offsets[i + 1]``.
What each token row uses is in ``LoRAStepIndex``, persistent device buffers the runner refills before every
step (CUDA graphs read them, so a captured graph follows adapters into any slot):

    token rows       t0 t1 t2 t3 t4 t5
    token_slots       0  0 -1  1  0  1         (-1: the base model, skipped)
    sorted_rows       0  1  4  3  5 ...        rows grouped by slot
    slot_start        0  3                     slot_num_rows  3  2   (slots 2.. : 0 rows, their programs exit)

Two ways to cover the rows, the same arithmetic:

* grouped (SGMV): programs per (tile of ``BLOCK_M`` rows of one slot's group, sub, slot), a ``tl.dot`` per
  tile, so A and B are read once per tile: steps with prompt chunks and large decode batches.
* per row (BGMV): programs per (row, sub) read ``token_slots`` directly: small decode steps, where a slot's
  group is a row or two and a 16-row tile would be mostly empty.

The choice depends on the step's token count only (``PER_ROW_MAX_TOKENS``), so a graph captured for a
bucket size keeps the right one. The intermediate ``xa`` is float32, one row per token and sub-projection;
when a step has few working programs the shrink splits the input dimension too (``_split_k``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

# Steps of at most this many token rows use the per-row kernels; larger ones group rows by slot.
PER_ROW_MAX_TOKENS = 16
_BLOCK_M = 16


@dataclass(slots=True)
class LoRAStepIndex:
    """Which token rows use which slot this step, in device buffers whose addresses never change.

    ``index`` packs, for ``max_num_tokens`` rows and ``max_loras`` slots:
    [token_slots | sorted_rows | slot_start | slot_num_rows], int32; one host-to-device copy per step, from
    two pinned host copies used in turn (an event guards each, as in StepBuffers: the runner may fill the
    next step while the GPU still copies the last one).
    """
    max_num_tokens: int
    max_loras: int
    index: torch.Tensor  # int32 [2 * max_num_tokens + 2 * max_loras]
    hosts: list[torch.Tensor]  # the same layout on the host
    events: list  # torch.cuda.Event per host copy (None off CUDA)
    _turn: int = 0

    @classmethod
    def allocate(cls, max_num_tokens: int, max_loras: int, device: torch.device) -> "LoRAStepIndex":
        size = 2 * max_num_tokens + 2 * max_loras
        on_cuda = device.type == "cuda"
        hosts = [torch.empty(size, dtype=torch.int32, pin_memory=on_cuda) for _ in range(2 if on_cuda else 1)]
        events = [torch.cuda.Event() if on_cuda else None for _ in hosts]
        step = cls(max_num_tokens, max_loras, torch.empty(size, dtype=torch.int32, device=device), hosts, events)
        step.fill(np.zeros(0, dtype=np.int32))
        return step

    @property
    def token_slots(self) -> torch.Tensor:
        return self.index[: self.max_num_tokens]

    @property
    def sorted_rows(self) -> torch.Tensor:
        return self.index[self.max_num_tokens: 2 * self.max_num_tokens]

    @property
    def slot_start(self) -> torch.Tensor:
        start = 2 * self.max_num_tokens
        return self.index[start: start + self.max_loras]

    @property
    def slot_num_rows(self) -> torch.Tensor:
        return self.index[2 * self.max_num_tokens + self.max_loras:]

    def fill(self, token_slots: np.ndarray) -> None:
        """Writes the step's per-row slots (-1: none) in place; rows past ``len(token_slots)`` (graph
        padding) get -1. Rows are grouped by slot with a stable sort, so a group keeps row order."""
        num_tokens = len(token_slots)
        if num_tokens > self.max_num_tokens:
            raise ValueError(f"{num_tokens} token rows, the LoRA index holds {self.max_num_tokens}")
        self._turn = (self._turn + 1) % len(self.hosts)
        host_tensor, event = self.hosts[self._turn], self.events[self._turn]
        if event is not None:
            event.synchronize()  # that copy ran two steps ago
        host = host_tensor.numpy()
        n, m = self.max_num_tokens, self.max_loras
        host[:n] = -1
        host[:num_tokens] = token_slots
        order = np.argsort(token_slots, kind="stable")
        counts = np.bincount(token_slots[token_slots >= 0], minlength=m)[:m]
        first_adapter_row = num_tokens - int(counts.sum())  # -1 rows sort first
        host[n: n + num_tokens - first_adapter_row] = order[first_adapter_row:]
        host[2 * n: 2 * n + m] = np.concatenate(([0], np.cumsum(counts)[:-1]))
        host[2 * n + m:] = counts
        self.index.copy_(host_tensor, non_blocking=True)
        if event is not None:
            event.record()


@triton.jit
def _tile_rows(sorted_rows_ptr, slot_start_ptr, slot, tile, num_rows, BLOCK_M: tl.constexpr):
    """The token rows of tile ``tile`` of ``slot``'s group (int64), and which of the BLOCK_M are real."""
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_m < num_rows
    rows = tl.load(sorted_rows_ptr + tl.load(slot_start_ptr + slot) + offs_m, mask=row_mask, other=0)
    return rows.to(tl.int64), row_mask


@triton.jit
def _shrink_grouped_kernel(x_ptr, a_ptr, xa_ptr, sorted_rows_ptr, slot_start_ptr, slot_num_rows_ptr,
                           K, R, stride_xm, stride_xk, stride_as, stride_ai, stride_ar, stride_ak,
                           stride_xas, stride_xam, split_k, k_per_split, PRECISION: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    pid, sub, slot = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    tile, split = pid // split_k, pid % split_k
    num_rows = tl.load(slot_num_rows_ptr + slot)
    if tile * BLOCK_M >= num_rows:
        return
    rows, row_mask = _tile_rows(sorted_rows_ptr, slot_start_ptr, slot, tile, num_rows, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    a_base = a_ptr + sub * stride_as + slot * stride_ai
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k_start = split * k_per_split
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        k = k0 + offs_k
        x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :] * stride_xk,
                    mask=row_mask[:, None] & (k[None, :] < K), other=0.0)
        a = tl.load(a_base + offs_r[None, :] * stride_ar + k[:, None] * stride_ak,
                    mask=(offs_r[None, :] < R) & (k[:, None] < K), other=0.0)  # A^T tile [BLOCK_K, BLOCK_R]
        acc = tl.dot(x, a, acc, input_precision=PRECISION)
    xa_ptrs = xa_ptr + sub * stride_xas + rows[:, None] * stride_xam + offs_r[None, :]
    mask = row_mask[:, None] & (offs_r[None, :] < R)
    if split_k == 1:
        tl.store(xa_ptrs, acc, mask=mask)
    else:
        tl.atomic_add(xa_ptrs, acc, mask=mask)


@triton.jit
def _shrink_per_row_kernel(x_ptr, a_ptr, xa_ptr, token_slots_ptr, K, R, stride_xm, stride_xk, stride_as,
                           stride_ai, stride_ar, stride_ak, stride_xas, stride_xam, split_k,
                           k_per_split, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    row, sub, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot = tl.load(token_slots_ptr + row)
    if slot < 0:
        return
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    a_base = a_ptr + sub * stride_as + slot.to(tl.int64) * stride_ai
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    k_start = split * k_per_split
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        k = k0 + offs_k
        x = tl.load(x_ptr + row * stride_xm + k * stride_xk, mask=k < K, other=0.0).to(tl.float32)
        a = tl.load(a_base + offs_r[:, None] * stride_ar + k[None, :] * stride_ak,
                    mask=(offs_r[:, None] < R) & (k[None, :] < K), other=0.0).to(tl.float32)
        acc += tl.sum(a * x[None, :], axis=1)
    xa_ptrs = xa_ptr + sub * stride_xas + row * stride_xam + offs_r
    if split_k == 1:
        tl.store(xa_ptrs, acc, mask=offs_r < R)
    else:
        tl.atomic_add(xa_ptrs, acc, mask=offs_r < R)


@triton.jit
def _expand_grouped_kernel(xa_ptr, b_ptr, out_ptr, sorted_rows_ptr, slot_start_ptr, slot_num_rows_ptr,
                           sub_offsets_ptr, R, num_n_tiles, stride_xas, stride_xam, stride_bs, stride_bn,
                           stride_br, stride_om, stride_on, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    pid, sub, slot = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    tile, n_tile = pid // num_n_tiles, pid % num_n_tiles
    num_rows = tl.load(slot_num_rows_ptr + slot)
    col_start = tl.load(sub_offsets_ptr + sub)
    col_end = tl.load(sub_offsets_ptr + sub + 1)
    if tile * BLOCK_M >= num_rows or col_start + n_tile * BLOCK_N >= col_end:
        return
    rows, row_mask = _tile_rows(sorted_rows_ptr, slot_start_ptr, slot, tile, num_rows, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    cols = col_start + n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < col_end
    xa = tl.load(xa_ptr + sub * stride_xas + rows[:, None] * stride_xam + offs_r[None, :],
                 mask=row_mask[:, None] & (offs_r[None, :] < R), other=0.0)
    b = tl.load(b_ptr + slot * stride_bs + cols[None, :] * stride_bn + offs_r[:, None] * stride_br,
                mask=col_mask[None, :] & (offs_r[:, None] < R), other=0.0)  # B^T tile [BLOCK_R, BLOCK_N]
    delta = tl.dot(xa.to(b.dtype), b, input_precision=PRECISION)
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
    mask = row_mask[:, None] & col_mask[None, :]
    out = tl.load(out_ptrs, mask=mask, other=0.0)
    tl.store(out_ptrs, (out.to(tl.float32) + delta).to(out.dtype), mask=mask)


@triton.jit
def _expand_per_row_kernel(xa_ptr, b_ptr, out_ptr, token_slots_ptr, sub_offsets_ptr, R, stride_xas, stride_xam,
                           stride_bs, stride_bn, stride_br, stride_om, stride_on,
                           BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    row, sub, n_tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot = tl.load(token_slots_ptr + row)
    col_start = tl.load(sub_offsets_ptr + sub)
    col_end = tl.load(sub_offsets_ptr + sub + 1)
    if slot < 0 or col_start + n_tile * BLOCK_N >= col_end:
        return
    offs_r = tl.arange(0, BLOCK_R)
    cols = col_start + n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < col_end
    xa = tl.load(xa_ptr + sub * stride_xas + row * stride_xam + offs_r, mask=offs_r < R, other=0.0)
    b = tl.load(b_ptr + slot.to(tl.int64) * stride_bs + cols[:, None] * stride_bn + offs_r[None, :] * stride_br,
                mask=col_mask[:, None] & (offs_r[None, :] < R), other=0.0).to(tl.float32)
    delta = tl.sum(b * xa[None, :], axis=1)
    out_ptrs = out_ptr + row * stride_om + cols * stride_on
    out = tl.load(out_ptrs, mask=col_mask, other=0.0)
    tl.store(out_ptrs, (out.to(tl.float32) + delta).to(out.dtype), mask=col_mask)


def _precision(t: torch.Tensor) -> str:
    return "ieee" if t.dtype == torch.float32 else "tf32"  # float32 stays exact; 16-bit ignores it


def _block_r(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _split_k(in_features: int, block_k: int, num_programs: int, device: torch.device) -> tuple[int, int]:
    """(splits of the input dimension, its length per split, a multiple of block_k). A shrink's output is tiny
    (r_max columns), so without splitting a decode step's few working programs each walk all of K (14336 for
    L8's down_proj) while the GPU idles; splits (summed with atomic adds) give it ~4 programs per SM."""
    max_split = max(1, in_features // (2 * block_k))  # at least two K-blocks per split
    split = max(1, min(max_split, 4 * _num_sms(device) // max(1, num_programs)))
    k_per_split = triton.cdiv(triton.cdiv(in_features, split), block_k) * block_k
    return triton.cdiv(in_features, k_per_split), k_per_split


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, xa: torch.Tensor, step: LoRAStepIndex) -> None:
    """xa[i, t] = x[t] A[i, slot(t)]^T for every sub-projection i and every row t with a slot (one launch).

    x [T, in]; lora_a [subs, slots, r_max, in]; xa float32 [>= subs, >= T, r_max] (rows without a slot are
    left as they are, unless the input dimension is split: then rows 0..T-1 are zeroed first)."""
    num_tokens, in_features = x.shape
    num_subs, num_slots, rank = lora_a.shape[:3]
    block_r = _block_r(rank)
    per_row = num_tokens <= PER_ROW_MAX_TOKENS
    block_k = 256 if per_row else 64
    # Working programs: a row (per row) or a 16-row tile of one slot's rows (at most T/16 + slots tiles).
    working = num_tokens * num_subs if per_row else (triton.cdiv(num_tokens, _BLOCK_M) + num_slots) * num_subs
    split_k, k_per_split = _split_k(in_features, block_k, working, x.device)
    if split_k > 1:
        xa[:num_subs, :num_tokens].zero_()
    if per_row:
        _shrink_per_row_kernel[(num_tokens, num_subs, split_k)](
            x, lora_a, xa, step.token_slots, in_features, rank, x.stride(0), x.stride(1), *lora_a.stride(),
            xa.stride(0), xa.stride(1), split_k, k_per_split, BLOCK_R=block_r, BLOCK_K=block_k)
        return
    _shrink_grouped_kernel[(triton.cdiv(num_tokens, _BLOCK_M) * split_k, num_subs, num_slots)](
        x, lora_a, xa, step.sorted_rows, step.slot_start, step.slot_num_rows, in_features, rank,
        x.stride(0), x.stride(1), *lora_a.stride(), xa.stride(0), xa.stride(1), split_k, k_per_split,
        PRECISION=_precision(x), BLOCK_M=_BLOCK_M, BLOCK_R=block_r, BLOCK_K=block_k)


def lora_expand(xa: torch.Tensor, lora_b: torch.Tensor, out: torch.Tensor, sub_offsets: torch.Tensor,
                max_sub_size: int, step: LoRAStepIndex) -> None:
    """out[t, offsets[i]:offsets[i+1]] += xa[i, t] B[slot(t), offsets[i]:offsets[i+1]]^T in place, every
    sub-projection in one launch. lora_b [slots, out, r_max] (scaling folded in); sub_offsets int32 [subs + 1]
    on the device; max_sub_size the widest sub-projection."""
    num_tokens = out.shape[0]
    num_subs = sub_offsets.shape[0] - 1
    num_slots, _, rank = lora_b.shape
    block_r = _block_r(rank)
    if num_tokens <= PER_ROW_MAX_TOKENS:
        block_n = 128
        _expand_per_row_kernel[(num_tokens, num_subs, triton.cdiv(max_sub_size, block_n))](
            xa, lora_b, out, step.token_slots, sub_offsets, rank, xa.stride(0), xa.stride(1), *lora_b.stride(),
            out.stride(0), out.stride(1), BLOCK_N=block_n, BLOCK_R=block_r)
        return
    block_n = 64
    num_n_tiles = triton.cdiv(max_sub_size, block_n)
    _expand_grouped_kernel[(triton.cdiv(num_tokens, _BLOCK_M) * num_n_tiles, num_subs, num_slots)](
        xa, lora_b, out, step.sorted_rows, step.slot_start, step.slot_num_rows, sub_offsets, rank, num_n_tiles,
        xa.stride(0), xa.stride(1), *lora_b.stride(), out.stride(0), out.stride(1), PRECISION=_precision(lora_b),
        BLOCK_M=_BLOCK_M, BLOCK_N=block_n, BLOCK_R=block_r)
