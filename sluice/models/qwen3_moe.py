"""Qwen3-MoE: Qwen3's attention (per-head q/k norms) and Qwen2-MoE's experts without the shared expert.

Routing as transformers: softmax, top ``num_experts_per_tok``, renormalized when ``norm_topk_prob``
(true for Qwen3-30B-A3B and Qwen3-235B-A22B), weights rounded to the model dtype.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from sluice.attention.backend import AttentionBackend
from sluice.layers.moe import SparseMoeBlock
from sluice.models.qwen2_moe import Qwen2MoeForCausalLM, is_sparse_layer
from sluice.models.qwen3 import Qwen3Attention


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    @classmethod
    def make_attention(cls, config: Any, attn_backend: AttentionBackend) -> nn.Module:
        return Qwen3Attention(config, attn_backend)

    @classmethod
    def make_mlp(cls, config: Any, layer_idx: int) -> nn.Module | None:
        if not is_sparse_layer(config, layer_idx):
            return None
        return SparseMoeBlock(config.hidden_size, config.num_experts, config.num_experts_per_tok,
                              config.moe_intermediate_size, renormalize=bool(config.norm_topk_prob),
                              round_weights_to_dtype=True)
