"""Qwen2: Llama's blocks with a bias on the q/k/v projections (never on o_proj)."""
from __future__ import annotations

from typing import Any

from torch import nn

from sluice.attention.backend import AttentionBackend
from sluice.models.llama import LlamaAttention, LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def make_attention(cls, config: Any, attn_backend: AttentionBackend) -> nn.Module:
        return LlamaAttention(config, attn_backend, qkv_bias=True, o_bias=False)
