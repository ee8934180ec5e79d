"""Qwen3: Llama's blocks plus an RMSNorm over each head of q and k, applied before rope."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sluice.attention.backend import AttentionBackend
from sluice.layers.norm import RMSNorm
from sluice.models.llama import LlamaAttention, LlamaForCausalLM


class Qwen3Attention(LlamaAttention):
    def __init__(self, config: Any, attn_backend: AttentionBackend) -> None:
        bias = bool(getattr(config, "attention_bias", False))
        super().__init__(config, attn_backend, qkv_bias=bias, o_bias=bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def project_qkv(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = super().project_qkv(hidden_states)
        num_tokens = q.shape[0]
        q = self.q_norm(q.reshape(num_tokens, -1, self.head_dim)).view(num_tokens, -1)
        k = self.k_norm(k.reshape(num_tokens, -1, self.head_dim)).view(num_tokens, -1)
        return q, k, v


class Qwen3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def make_attention(cls, config: Any, attn_backend: AttentionBackend) -> nn.Module:
        return Qwen3Attention(config, attn_backend)
