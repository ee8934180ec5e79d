"""Gemma 3 (text): Gemma 2's blocks plus (1 + weight) norms over each head of q and k before rope,
and a rope per layer type (local sliding-window layers keep a 10K base, global layers their own
base and scaling: config.rope_parameters["sliding_attention" / "full_attention"])."""
from __future__ import annotations

from typing import Any

from torch import nn

from sluice.attention.backend import AttentionBackend
from sluice.layers.norm import GemmaRMSNorm
from sluice.layers.rotary import get_rope
from sluice.models.gemma2 import Gemma2ForCausalLM, gemma_attention_kwargs
from sluice.models.llama import QKNormAttention, get_head_dim


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    @classmethod
    def make_layer_attention(cls, config: Any, attn_backend: AttentionBackend, layer_idx: int) -> nn.Module:
        layer_types = getattr(config, "layer_types", None)
        rope = get_rope(get_head_dim(config), config, layer_types[layer_idx] if layer_types else None)
        return QKNormAttention(config, attn_backend, GemmaRMSNorm, rotary_emb=rope, **gemma_attention_kwargs(config))
