"""Mixtral: Llama's attention, and a sparse mixture of experts as every layer's feed-forward block.

Each token goes to ``num_experts_per_tok`` of ``num_local_experts`` experts, their weights always
renormalized to sum to 1 (kept in float32, as transformers does). Checkpoints name the block
``block_sparse_moe`` and the experts' projections w1 (gate), w3 (up), w2 (down).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from sluice.layers.moe import SparseMoeBlock, expert_param_for
from sluice.models.llama import LlamaForCausalLM


class MixtralForCausalLM(LlamaForCausalLM):
    @classmethod
    def make_mlp(cls, config: Any, layer_idx: int) -> nn.Module:
        return SparseMoeBlock(config.hidden_size, config.num_local_experts, config.num_experts_per_tok,
                              config.intermediate_size, renormalize=True)

    def _param_for(self, checkpoint_name: str) -> tuple[str, Any]:
        checkpoint_name = checkpoint_name.replace(".block_sparse_moe.", ".mlp.")
        return expert_param_for(checkpoint_name, "w1", "w3", "w2") or super()._param_for(checkpoint_name)
