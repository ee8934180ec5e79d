"""The attention layer the models call: writes this step's K/V to the paged cache, then attends.

The math lives in the backend (``sluice.attention``: torch reference on CPU, Triton on CUDA);
this module only reshapes packed [T, heads * head_dim] tensors to [T, heads, head_dim] and back.
Its ``kv_cache`` ([2, num_blocks, block_size, num_kv_heads, head_dim]) is not a parameter or
buffer: the model runner allocates the caches once memory is measured and binds them with
``bind_kv_cache``, one per Attention module in layer order.

An fp8 cache (``--kv-cache-dtype fp8``, sluice/attention/kv_quant.py) is written and read through the layer's
``kv_scales`` ([k_scale, v_scale], float32): 1.0, the checkpoint's (models/kv_scales.py), or, with
``--calculate-kv-scales``, amax / 448 of the K and V of the first step the model runner flags.
"""
from __future__ import annotations

import torch
from torch import nn

from sluice.attention.backend import AttentionBackend, AttentionMetadata


class Attention(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int,
                 backend: AttentionBackend, sliding_window: int | None = None,
                 logits_soft_cap: float | None = None) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, num_kv_heads
        self.scale = scale
        # Per-layer attention options (Mistral, Gemma): handed to the backend on every call.
        self.sliding_window, self.logits_soft_cap = sliding_window, logits_soft_cap
        self.backend = backend
        self.kv_cache = torch.empty(0)  # bound by bind_kv_cache
        self.kv_scales = torch.ones(2, dtype=torch.float32)  # moved to the cache's device by bind_kv_cache
        self.calculate_kv_scales = False  # set for one step by the model runner (--calculate-kv-scales)
        self.kv_group = 0  # its layer group's block table (bind_kv_cache; > 0 only with windowed and global layers)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        """q: [T, H * D], k/v: [T, Hkv * D] -> [T, H * D]."""
        if self.kv_cache.numel() == 0:
            raise RuntimeError("Attention has no KV cache: call bind_kv_cache(model, kv_caches) first")
        if self.kv_group:
            attn_metadata = attn_metadata.kv_groups[self.kv_group - 1]
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.calculate_kv_scales:
            from sluice.attention.kv_quant import calculated_kv_scales
            self.kv_scales.copy_(calculated_kv_scales(k, v))
        self.backend.write_kv(k, v, self.kv_cache, attn_metadata.slot_mapping, kv_scales=self.kv_scales)
        out = self.backend.forward(q, self.kv_cache, attn_metadata, self.scale, sliding_window=self.sliding_window,
                                   logits_soft_cap=self.logits_soft_cap, kv_scales=self.kv_scales)
        return out.reshape(num_tokens, self.num_heads * self.head_dim)


def bind_kv_cache(model: nn.Module, kv_caches: list[torch.Tensor], kv_groups: list[int] | None = None) -> None:
    """Gives the i-th Attention module (in layer order) ``kv_caches[i]``; an empty list unbinds all.
    ``kv_groups[i]``: the layer group whose block table layer i reads (windowed and global layers mixed)."""
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    if kv_caches and len(kv_caches) != len(layers):
        raise ValueError(f"kv_caches has {len(kv_caches)} tensors but the model has {len(layers)} attention layers")
    for i, layer in enumerate(layers):
        layer.kv_cache = kv_caches[i] if kv_caches else torch.empty(0)
        layer.kv_group = kv_groups[i] if kv_groups else 0
        if kv_caches:  # the kernels read the scales on the cache's device (a no-op once they are there)
            layer.kv_scales = layer.kv_scales.to(kv_caches[i].device)
