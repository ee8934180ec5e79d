"""Token embedding and LM head.

Both hold a [vocab_size, hidden_size] table; with ``tie_word_embeddings`` the model makes the
head share the embedding's Parameter, so one checkpoint tensor fills both. The loaders narrow
by vocab rows per tensor-parallel rank (a single rank for now) like the linear layers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sluice.layers.linear import copy_weight_checked, get_tp_rank_and_size


class VocabEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank_and_size()
        self.num_embeddings = num_embeddings
        self.num_embeddings_per_rank = num_embeddings // self.tp_size
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_rank, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.weight.num_shards = 1

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        rows = self.num_embeddings_per_rank
        with torch.no_grad():
            copy_weight_checked(param.data, loaded_weight.narrow(0, self.tp_rank * rows, rows), type(self).__name__)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size > 1:
            raise NotImplementedError("vocab-parallel embedding lookup is not wired yet")
        return F.embedding(input_ids, self.weight)


class LMHead(VocabEmbedding):
    """hidden [N, H] -> logits [N, vocab] in float32 (what the sampler expects)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bias: bool = False) -> None:
        super().__init__(num_embeddings, embedding_dim)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.num_embeddings_per_rank), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
            self.bias.num_shards = 1
        else:
            self.register_parameter("bias", None)

    def tie_to(self, embedding: VocabEmbedding) -> None:
        """Share the embedding's table (tie_word_embeddings): one Parameter, loaded once."""
        self.weight = embedding.weight

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.tp_size > 1:
            raise NotImplementedError("vocab-parallel logits gather is not wired yet")
        return F.linear(hidden_states, self.weight, self.bias).float()
