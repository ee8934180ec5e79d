"""Gemma 2: Llama's blocks with Gemma's differences.

    embed_tokens * sqrt(hidden_size)
      -> N x [input_layernorm -> self_attn -> post_attention_layernorm -> + residual
              -> pre_feedforward_layernorm -> GeGLU mlp -> post_feedforward_layernorm -> + residual]
      -> norm -> lm_head (tied to the embedding) -> final_logit_softcapping

Norms scale by (1 + weight) (GemmaRMSNorm). Attention scales scores by query_pre_attn_scalar ** -0.5
and soft-caps them (attn_logit_softcapping); layers alternate sliding-window and global attention
(config.layer_types, applied by LlamaForCausalLM).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sluice.attention.backend import AttentionBackend, AttentionMetadata
from sluice.layers.activation import get_gated_activation
from sluice.layers.norm import GemmaRMSNorm
from sluice.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP


def gemma_attention_kwargs(config: Any) -> dict[str, Any]:
    """Scale and soft cap of Gemma's attention (shared by Gemma 2 and 3)."""
    return dict(scale=config.query_pre_attn_scalar ** -0.5,
                logits_soft_cap=getattr(config, "attn_logit_softcapping", None))


class GemmaDecoderLayer(LlamaDecoderLayer):
    """Sandwich norms: each sub-block's output is normed before it joins the residual stream."""

    def __init__(self, config: Any, self_attn: nn.Module) -> None:
        activation = getattr(config, "hidden_activation", None) or config.hidden_act
        mlp = LlamaMLP(config.hidden_size, config.intermediate_size, act_fn=get_gated_activation(activation))
        super().__init__(config, self_attn, mlp, GemmaRMSNorm)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
                attn_metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_states, residual = self.input_norm(hidden_states, residual)
        hidden_states = self.post_attention_layernorm(self.self_attn(positions, hidden_states, attn_metadata))
        hidden_states, residual = self.pre_feedforward_layernorm(hidden_states, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden_states)), residual


class Gemma2ForCausalLM(LlamaForCausalLM):
    norm_class = GemmaRMSNorm

    @classmethod
    def make_layer(cls, config: Any, attn_backend: AttentionBackend, layer_idx: int) -> nn.Module:
        return GemmaDecoderLayer(config, cls.make_layer_attention(config, attn_backend, layer_idx))

    @classmethod
    def make_layer_attention(cls, config: Any, attn_backend: AttentionBackend, layer_idx: int) -> nn.Module:
        bias = bool(getattr(config, "attention_bias", False))
        return LlamaAttention(config, attn_backend, qkv_bias=bias, o_bias=bias, **gemma_attention_kwargs(config))

    @classmethod
    def embedding_multiplier(cls, config: Any) -> float | None:
        return config.hidden_size ** 0.5

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden_states)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
