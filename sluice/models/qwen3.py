"""Qwen3: Llama's blocks plus an RMSNorm over each head of q and k, applied before rope."""
from __future__ import annotations

from typing import Any

from torch import nn

from sluice.attention.backend import AttentionBackend
from sluice.layers.norm import RMSNorm
from sluice.models.llama import LlamaForCausalLM, QKNormAttention


class Qwen3Attention(QKNormAttention):
    def __init__(self, config: Any, attn_backend: AttentionBackend) -> None:
        super().__init__(config, attn_backend, RMSNorm)


class Qwen3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def make_attention(cls, config: Any, attn_backend: AttentionBackend) -> nn.Module:
        return Qwen3Attention(config, attn_backend)
