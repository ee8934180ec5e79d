"""Fast CPU paged attention: whole groups of requests in one padded SDPA call, no per-request loop.

The step's requests fall in two groups, each attended to in one batched call per layer:

    decodes  (query_len 1)   q [B, H, 1, D]       keys [B, Hkv, L_dec, D]
    chunks   (query_len > 1) q [P, H, max_q, D]   keys [P, Hkv, L_chk, D]

A group's keys and values come out of the paged cache with one ``index_select`` of its block table
(``[n, num_blocks] -> [n * num_blocks, block_size, Hkv, D] -> [n, L, Hkv, D]``), from the first block
any of its queries can see (sliding windows) to the last one any of them needs. A boolean mask keeps
each query row to its own causal (and windowed) range, so padding keys and padding query rows never
leak into a real row; padding query rows repeat their request's last row (never fully masked, no NaN)
and are dropped on the way out. Everything that depends only on the step (groups, gather indices,
masks per window size) is the *plan*: built once per step and shared by every layer.

Without a soft cap the math is ``scaled_dot_product_attention`` (GQA through ``enable_gqa``); with a
soft cap it is the same masked softmax written out in float32, as the reference does. Semantics are
those of ``torch_ref.py``, the reference these are tested against. An fp8 cache (kv_quant.py) is read in
the query's dtype with its scales folded into the math: k_scale into the softmax scale, v_scale into the output.

Decodes go to the native paged decode kernel (cpu_kernel.py, csrc/paged_decode.c) when it could be built: it
reads K/V in place through the block table (no gathered copies, no mask) and writes the decode rows of the
output directly. Its int32 arguments (table rows, sequence lengths, token of each decode) are part of the plan.
Without a C compiler, with ``native_decode=False`` (``SLUICE_CPU_ATTENTION=sdpa``), or for shapes outside the
kernel's (head_dim not a multiple of 8 or above 256, more than 16 query heads per KV head), decodes use SDPA.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from sluice.attention import cpu_kernel
from sluice.attention.backend import AttentionMetadata
from sluice.attention.kv_quant import FP8_KV_DTYPE, kv_scales_of
from sluice.attention.torch_ref import TorchRefBackend


@dataclass(slots=True)
class _Group:
    """Requests attended to in one padded call: ``n`` requests, query rows padded to ``max_query_len``."""
    rows: torch.Tensor  # int64 [n]: the requests' rows in metadata.block_table
    max_query_len: int
    gather_index: torch.Tensor | None  # packed token of each padded query row [n * max_q]; None: all, in order
    real_rows: torch.Tensor | None  # padded rows that are real query tokens; None: all are
    scatter_index: torch.Tensor | None  # packed token of each real row
    query_pos: torch.Tensor  # int64 [n, max_q, 1]: position of each (padded) query row
    query_lens: np.ndarray
    seq_lens: np.ndarray
    # (block_size, sliding_window) -> (block ids [n * num_blocks], mask [n, 1, max_q, L]); built at first use
    keys: dict[tuple[int, int | None], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # (block_size, sliding_window, dtype) -> the mask as SDPA adds it: 0 where visible, -inf elsewhere
    additive_masks: dict[tuple[int, int | None, torch.dtype], torch.Tensor] = field(default_factory=dict)

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens)

    def key_layout(self, block_table: torch.Tensor, block_size: int, sliding_window: int | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """The group's block ids to gather and its attention mask (True: may attend), for a layer."""
        layout = self.keys.get((block_size, sliding_window))
        if layout is None:
            first_block = 0
            if sliding_window is not None:  # blocks wholly before every window are never read
                first_block = int(np.maximum(self.seq_lens - self.query_lens - sliding_window + 1, 0).min()) // block_size
            last_block = -(-int(self.seq_lens.max()) // block_size)
            block_ids = block_table.index_select(0, self.rows)[:, first_block:last_block].reshape(-1).long()
            key_pos = torch.arange(first_block * block_size, last_block * block_size)
            mask = key_pos <= self.query_pos
            if sliding_window is not None:
                mask &= key_pos > self.query_pos - sliding_window
            layout = self.keys[(block_size, sliding_window)] = (block_ids, mask.unsqueeze(1))
        return layout

    def additive_mask(self, mask: torch.Tensor, block_size: int, sliding_window: int | None,
                      dtype: torch.dtype) -> torch.Tensor:
        """``mask`` as a float bias in ``dtype``: SDPA would convert a boolean mask on every call."""
        key = (block_size, sliding_window, dtype)
        bias = self.additive_masks.get(key)
        if bias is None:
            bias = self.additive_masks[key] = torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf"))
        return bias


@dataclass(slots=True)
class _NativeDecodes:
    """The decode group as the native kernel takes it: int32 arrays kept alive here, their pointers precomputed."""
    arrays: tuple[torch.Tensor, ...]  # block table, table rows, seq lens, tokens (or None: token i is request i)
    pointer_args: tuple  # (block_table, rows, seq_lens, tokens) data pointers
    num_reqs: int
    table_stride: int
    num_threads: int


@dataclass(slots=True)
class CpuAttentionPlan:
    groups: list[_Group]
    num_tokens: int  # real query tokens of the step (the query may carry padding after them)
    native_decodes: _NativeDecodes | None = None  # set: groups[0] (the decodes) runs in the native kernel


_KERNEL_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, FP8_KV_DTYPE: 3}


class CpuSdpaBackend:
    name = "cpu_sdpa"

    def __init__(self, native_decode: bool = True):
        self.native_decode = native_decode
        self._kernel = None  # loaded (compiled if need be) by the first plan with decodes

    def plan(self, metadata: AttentionMetadata, num_tokens: int, num_heads: int, num_kv_heads: int
             ) -> CpuAttentionPlan:
        qsl = metadata.query_start_loc_cpu
        seq_lens = metadata.seq_lens_cpu
        qsl = np.asarray(qsl if qsl is not None else metadata.query_start_loc.tolist(), dtype=np.int64)
        seq_lens = np.asarray(seq_lens if seq_lens is not None else metadata.seq_lens.tolist(), dtype=np.int64)
        qsl, seq_lens = qsl[:metadata.num_reqs + 1], seq_lens[:metadata.num_reqs]
        query_lens = qsl[1:] - qsl[:-1]
        groups = [_make_group(members, qsl, query_lens, seq_lens, metadata.num_actual_tokens)
                  for members in (np.flatnonzero(query_lens == 1), np.flatnonzero(query_lens > 1))
                  if len(members)]
        plan = CpuAttentionPlan(groups, metadata.num_actual_tokens)
        if self.native_decode and groups and groups[0].max_query_len == 1 and self._load_kernel() is not None:
            plan.native_decodes = _native_decodes(groups[0], qsl, metadata.block_table)
        return plan

    def _load_kernel(self):
        if self._kernel is None:
            self._kernel = cpu_kernel.load_paged_decode() or False
        return self._kernel or None

    write_kv = TorchRefBackend.write_kv  # the same index_copy_ into the flat slots

    def forward(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata,
                scale: float, sliding_window: int | None = None,
                logits_soft_cap: float | None = None, kv_scales: torch.Tensor | None = None) -> torch.Tensor:
        v_scale = 1.0
        scales = kv_scales_of(kv_cache, kv_scales)
        if scales is not None:  # scores use k * k_scale: fold it into the softmax scale; v_scale scales the output
            k_scale, v_scale = scales.tolist()
            scale = scale * k_scale
        plan = metadata.plan
        if not isinstance(plan, CpuAttentionPlan):
            plan = self.plan(metadata, query.shape[0], query.shape[1], kv_cache.shape[3])
        groups = plan.groups
        native = plan.native_decodes
        if native is not None and not _kernel_takes(query, kv_cache):
            native = None
        if len(groups) == 1 and groups[0].gather_index is None and plan.num_tokens == query.shape[0]:
            if native is not None:
                out = torch.empty(query.shape, dtype=query.dtype)
                self._decode(out, query, kv_cache, native, scale, v_scale, sliding_window, logits_soft_cap)
                return out
            out = _attend(query, kv_cache, metadata.block_table, groups[0], scale, sliding_window, logits_soft_cap)
            return out if v_scale == 1.0 else out.mul_(v_scale)
        out = torch.zeros(query.shape, dtype=query.dtype)  # padding tokens (if any) attend to nothing
        if native is not None:  # writes the decode rows in place; the chunks follow
            self._decode(out, query, kv_cache, native, scale, v_scale, sliding_window, logits_soft_cap)
            groups = groups[1:]
        for group in groups:
            q = query.index_select(0, group.gather_index) if group.gather_index is not None \
                else query[:plan.num_tokens]
            o = _attend(q, kv_cache, metadata.block_table, group, scale, sliding_window, logits_soft_cap)
            if group.real_rows is not None:
                o = o.index_select(0, group.real_rows)
            if v_scale != 1.0:  # the kernel's rows come scaled already
                o = o.mul_(v_scale)
            if group.scatter_index is None:
                out[:plan.num_tokens] = o
            else:
                out.index_copy_(0, group.scatter_index, o)
        return out

    def _decode(self, out: torch.Tensor, query: torch.Tensor, kv_cache: torch.Tensor, native: _NativeDecodes,
                scale: float, v_scale: float, sliding_window: int | None, logits_soft_cap: float | None) -> None:
        """The decode rows of ``out`` from the native kernel (v_scale applied)."""
        if query.stride(2) != 1 or query.stride(1) != query.shape[2]:
            query = query.contiguous()
        _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
        rc = self._kernel(out.data_ptr(), query.data_ptr(), kv_cache.data_ptr(), *native.pointer_args,
                          native.num_reqs, query.shape[1], num_kv_heads, head_dim, block_size, num_blocks,
                          native.table_stride, query.stride(0), out.stride(0), _KERNEL_DTYPES[query.dtype],
                          _KERNEL_DTYPES[kv_cache.dtype], scale, v_scale, sliding_window or 0,
                          logits_soft_cap or 0.0, native.num_threads)
        if rc != 0:
            raise RuntimeError(f"the CPU paged decode kernel refused its arguments (code {rc})")


def _kernel_takes(query: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """Whether the native kernel handles this layer: its dtypes, a contiguous cache, head shapes in its bounds."""
    head_dim, num_heads, num_kv_heads = query.shape[2], query.shape[1], kv_cache.shape[3]
    return (query.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and kv_cache.dtype in (query.dtype, FP8_KV_DTYPE) and kv_cache.is_contiguous()
            and head_dim % 8 == 0 and head_dim <= cpu_kernel.MAX_HEAD_DIM
            and num_heads % num_kv_heads == 0 and num_heads // num_kv_heads <= cpu_kernel.MAX_GROUP
            and kv_cache.shape[2] <= cpu_kernel.MAX_BLOCK_SIZE)


def _native_decodes(group: _Group, qsl: np.ndarray, block_table: torch.Tensor) -> _NativeDecodes:
    table = block_table if block_table.dtype == torch.int32 and block_table.is_contiguous() \
        else block_table.to(torch.int32).contiguous()
    rows = group.rows.to(torch.int32)
    seq_lens = torch.from_numpy(group.seq_lens.astype(np.int32))
    members = group.rows.numpy()
    tokens = None if group.gather_index is None else torch.from_numpy(qsl[members].astype(np.int32))
    arrays = (table, rows, seq_lens, tokens)
    pointers = tuple(None if a is None else a.data_ptr() for a in arrays)
    return _NativeDecodes(arrays, pointers, group.num_reqs, table.stride(0), torch.get_num_threads())


def _make_group(members: np.ndarray, qsl: np.ndarray, query_lens: np.ndarray, seq_lens: np.ndarray,
                num_actual_tokens: int) -> _Group:
    lens, seqs = query_lens[members], seq_lens[members]
    max_q = int(lens.max())
    offsets = np.minimum(np.arange(max_q)[None, :], lens[:, None] - 1)  # padding rows repeat the last one
    real = np.arange(max_q)[None, :] < lens[:, None]
    tokens = qsl[members][:, None] + offsets
    gather_index = real_rows = scatter_index = None
    in_order = tokens.size == num_actual_tokens and bool((tokens.ravel() == np.arange(tokens.size)).all())
    if not in_order:
        gather_index = torch.from_numpy(tokens.ravel())
        if not real.all():
            real_rows = torch.from_numpy(np.flatnonzero(real.ravel()))
        scatter_index = torch.from_numpy(np.ascontiguousarray(tokens[real]))
    query_pos = torch.from_numpy((seqs - lens)[:, None] + offsets).unsqueeze(-1)
    return _Group(torch.from_numpy(members), max_q, gather_index, real_rows, scatter_index, query_pos,
                  lens, seqs)


def _attend(query: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, group: _Group,
            scale: float, sliding_window: int | None, logits_soft_cap: float | None) -> torch.Tensor:
    """query: the group's padded query rows [n * max_q, H, D] -> their outputs, same shape."""
    n, max_q = group.num_reqs, group.max_query_len
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = kv_cache.shape[3]
    block_ids, mask = group.key_layout(block_table, kv_cache.shape[2], sliding_window)
    k = kv_cache[0].index_select(0, block_ids).view(n, -1, num_kv_heads, head_dim).transpose(1, 2)
    v = kv_cache[1].index_select(0, block_ids).view(n, -1, num_kv_heads, head_dim).transpose(1, 2)
    q = query.view(n, max_q, num_heads, head_dim).transpose(1, 2)  # [n, H, max_q, D]
    if logits_soft_cap is None:
        if k.dtype != q.dtype:
            k, v = k.to(q.dtype), v.to(q.dtype)
        bias = group.additive_mask(mask, kv_cache.shape[2], sliding_window, q.dtype)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale,
                                           enable_gqa=num_heads != num_kv_heads)
    else:
        o = _soft_capped_attention(q, k, v, mask, scale, logits_soft_cap)
    return o.transpose(1, 2).reshape(n * max_q, num_heads, head_dim)


def _soft_capped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                           cap: float) -> torch.Tensor:
    """q [n, H, max_q, D], k/v [n, Hkv, L, D], mask [n, 1, max_q, L] -> [n, H, max_q, D], in float32."""
    n, num_heads, max_q, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    qg = q.reshape(n, num_kv_heads, group * max_q, head_dim).float()  # heads of one KV head are adjacent
    scores = torch.matmul(qg, k.float().transpose(-1, -2)) * scale  # [n, Hkv, G * max_q, L]
    scores = cap * torch.tanh(scores / cap)
    scores = scores.view(n, num_kv_heads, group, max_q, -1).masked_fill_(~mask.unsqueeze(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(n, num_kv_heads, group * max_q, -1)
    return torch.matmul(probs, v.float()).view(n, num_heads, max_q, head_dim).to(q.dtype)
