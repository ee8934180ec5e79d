"""Qwen2-MoE: Qwen2's attention (q/k/v bias), and a mixture of experts plus a shared expert.

    mlp(x) = experts(x) + sigmoid(shared_expert_gate(x)) * shared_expert(x)

The routed weights are renormalized only when ``norm_topk_prob`` says so, and rounded to the model
dtype as transformers does. Layers listed in ``mlp_only_layers``, or off the ``decoder_sparse_step``
stride, keep a dense MLP of ``intermediate_size``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sluice.attention.backend import AttentionBackend
from sluice.layers.linear import ReplicatedLinear
from sluice.layers.moe import SparseMoeBlock, expert_param_for
from sluice.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP


class Qwen2MoeSparseMoeBlock(SparseMoeBlock):
    def __init__(self, config: Any) -> None:
        super().__init__(config.hidden_size, config.num_experts, config.num_experts_per_tok,
                         config.moe_intermediate_size, renormalize=bool(config.norm_topk_prob),
                         round_weights_to_dtype=True)
        self.shared_expert = LlamaMLP(config.hidden_size, config.shared_expert_intermediate_size)
        self.shared_expert_gate = ReplicatedLinear(config.hidden_size, 1, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shared = torch.sigmoid(self.shared_expert_gate(hidden_states)) * self.shared_expert(hidden_states)
        return super().forward(hidden_states) + shared


def is_sparse_layer(config: Any, layer_idx: int) -> bool:
    """Whether layer ``layer_idx`` is a mixture of experts (transformers' rule for Qwen2/3-MoE)."""
    return (layer_idx not in (getattr(config, "mlp_only_layers", None) or []) and config.num_experts > 0
            and (layer_idx + 1) % getattr(config, "decoder_sparse_step", 1) == 0)


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    @classmethod
    def make_attention(cls, config: Any, attn_backend: AttentionBackend) -> nn.Module:
        return LlamaAttention(config, attn_backend, qkv_bias=bool(getattr(config, "qkv_bias", True)), o_bias=False)

    @classmethod
    def make_mlp(cls, config: Any, layer_idx: int) -> nn.Module | None:
        return Qwen2MoeSparseMoeBlock(config) if is_sparse_layer(config, layer_idx) else None

    def _param_for(self, checkpoint_name: str) -> tuple[str, Any]:
        return (expert_param_for(checkpoint_name, "gate_proj", "up_proj", "down_proj")
                or super()._param_for(checkpoint_name))
