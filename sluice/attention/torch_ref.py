"""Reference paged attention in plain torch: the path the tests trust, and the CPU backend.

It loops over requests (fine on CPU, where batches are small), gathers each request's
K/V through its block table and runs causal softmax attention in float32.

Per-layer options, as vLLM names them: ``sliding_window`` W (a query at position p sees
positions p - W + 1 .. p, as transformers' sliding-window mask does; blocks wholly before the
window are never read, so the KV cache manager may have recycled them) and ``logits_soft_cap``
c (scores become c * tanh(scores / c) before the mask, Gemma 2).

An fp8 KV cache (kv_quant.py) is written as ``x / scale`` in float8 and read back as ``float(x) * scale``, in
float32, before any of the math.
"""
from __future__ import annotations

import torch

from sluice.attention.backend import AttentionMetadata
from sluice.attention.kv_quant import kv_scales_of, quantize_fp8


class TorchRefBackend:
    name = "torch_ref"

    def plan(self, metadata: AttentionMetadata, num_tokens: int, num_heads: int, num_kv_heads: int) -> None:
        return None  # it decides nothing ahead: it loops over the requests

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, kv_scales: torch.Tensor | None = None) -> None:
        num_blocks, block_size = kv_cache.shape[1], kv_cache.shape[2]
        flat = kv_cache.view(2, num_blocks * block_size, *kv_cache.shape[3:])
        scales = kv_scales_of(kv_cache, kv_scales)
        if scales is None:
            flat[0].index_copy_(0, slot_mapping, key.to(kv_cache.dtype))
            flat[1].index_copy_(0, slot_mapping, value.to(kv_cache.dtype))
            return
        flat = flat.view(torch.uint8)  # torch has no float8 index_copy_ on the CPU: the bytes are the same
        flat[0].index_copy_(0, slot_mapping, quantize_fp8(key, scales[0]).view(torch.uint8))
        flat[1].index_copy_(0, slot_mapping, quantize_fp8(value, scales[1]).view(torch.uint8))

    def forward(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata,
                scale: float, sliding_window: int | None = None,
                logits_soft_cap: float | None = None, kv_scales: torch.Tensor | None = None) -> torch.Tensor:
        scales = kv_scales_of(kv_cache, kv_scales)
        qsl = metadata.query_start_loc_cpu or metadata.query_start_loc.tolist()
        seq_lens = metadata.seq_lens_cpu or metadata.seq_lens.tolist()
        block_size = kv_cache.shape[2]
        num_heads, num_kv_heads = query.shape[1], kv_cache.shape[3]
        group = num_heads // num_kv_heads
        out = torch.empty_like(query)
        for i in range(metadata.num_reqs):
            start, end = qsl[i], qsl[i + 1]
            if end == start:
                continue
            seq_len = seq_lens[i]
            num_blocks = (seq_len + block_size - 1) // block_size
            first_block = 0
            if sliding_window is not None:  # the first query's window starts here; earlier blocks are never read
                first_block = max(0, seq_len - (end - start) - sliding_window + 1) // block_size
            blocks = metadata.block_table[i, first_block:num_blocks].long()
            first_pos = first_block * block_size
            # [num_blocks, block_size, kv_heads, d] -> [seq_len - first_pos, kv_heads, d]
            k = kv_cache[0, blocks].reshape(-1, num_kv_heads, kv_cache.shape[4])[:seq_len - first_pos]
            v = kv_cache[1, blocks].reshape(-1, num_kv_heads, kv_cache.shape[4])[:seq_len - first_pos]
            if scales is not None:
                k, v = k.float() * scales[0], v.float() * scales[1]
            out[start:end] = _causal_attention(query[start:end], k, v, scale, group, first_pos, seq_len,
                                               sliding_window, logits_soft_cap)
        return out


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, group: int,
                      first_pos: int, seq_len: int, sliding_window: int | None,
                      logits_soft_cap: float | None) -> torch.Tensor:
    """q: [Lq, H, D] at the last Lq of seq_len positions; k/v: [Lk, Hkv, D] at positions first_pos..seq_len-1."""
    q_len = q.shape[0]
    k = k.repeat_interleave(group, dim=1).float()
    v = v.repeat_interleave(group, dim=1).float()
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    if logits_soft_cap is not None:
        scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
    q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device).unsqueeze(1)
    k_pos = torch.arange(first_pos, seq_len, device=q.device).unsqueeze(0)
    hidden = k_pos > q_pos
    if sliding_window is not None:
        hidden |= k_pos <= q_pos - sliding_window
    scores.masked_fill_(hidden, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
