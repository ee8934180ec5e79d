"""Phi-3, Phi-3.5 and Phi-4: Llama's blocks; checkpoints store qkv_proj and gate_up_proj fused.

The loader splits them back into the q/k/v and gate/up shards the merged layers load
(``split_fused_weights``); rope is usually longrope (``su``), with partial rotary dims on Phi-4-mini.

    qkv_proj.weight      [q: heads * head_dim | k: kv_heads * head_dim | v: kv_heads * head_dim]
    gate_up_proj.weight  [gate: intermediate | up: intermediate]
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from sluice.models.llama import LlamaForCausalLM, get_head_dim, get_num_kv_heads


class Phi3ForCausalLM(LlamaForCausalLM):
    def split_fused_weights(self, weights: Iterable[tuple[str, torch.Tensor]]
                            ) -> Iterator[tuple[str, torch.Tensor]]:
        head_dim = get_head_dim(self.config)
        q_size = self.config.num_attention_heads * head_dim
        kv_size = get_num_kv_heads(self.config) * head_dim
        for name, tensor in weights:
            if ".qkv_proj." in name:
                for part, shard in zip(("q", "k", "v"), tensor.split([q_size, kv_size, kv_size], dim=0)):
                    yield name.replace(".qkv_proj.", f".{part}_proj."), shard
            elif ".gate_up_proj." in name:
                gate, up = tensor.chunk(2, dim=0)
                yield name.replace(".gate_up_proj.", ".gate_proj."), gate
                yield name.replace(".gate_up_proj.", ".up_proj."), up
            else:
                yield name, tensor
