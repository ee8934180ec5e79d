"""Token embedding and LM head.

Both hold a [vocab_size, hidden_size] table; with ``tie_word_embeddings`` the model makes the
head share the embedding's Parameter, so one checkpoint tensor fills both.

With tensor parallelism each rank holds ceil(vocab / N) consecutive rows (the last rank's tail
zero-padded). The embedding looks up the ids in its range, zeros the others and all-reduces; the
head computes its rows' logits and all-gathers them, so every rank gets the whole [N, vocab].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sluice.distributed.communication import tp_all_gather, tp_all_reduce
from sluice.layers.linear import copy_weight_checked, get_tp_rank_and_size


class VocabEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank_and_size()
        self.num_embeddings = num_embeddings
        self.num_embeddings_per_rank = -(-num_embeddings // self.tp_size)
        self.vocab_start = self.tp_rank * self.num_embeddings_per_rank
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_rank, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.weight.num_shards = 1

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if self.tp_size == 1:
            with torch.no_grad():
                copy_weight_checked(param.data, loaded_weight, type(self).__name__)
            return
        if loaded_weight.shape[0] != self.num_embeddings:
            raise ValueError(f"{type(self).__name__}: checkpoint tensor has {loaded_weight.shape[0]} rows, "
                             f"expected {self.num_embeddings}")
        rows = min(self.num_embeddings_per_rank, self.num_embeddings - self.vocab_start)
        with torch.no_grad():
            param.data.zero_()
            copy_weight_checked(param.data.narrow(0, 0, rows), loaded_weight.narrow(0, self.vocab_start, rows),
                                type(self).__name__)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local_ids = input_ids - self.vocab_start
        outside = (local_ids < 0) | (local_ids >= self.num_embeddings_per_rank)
        embeddings = F.embedding(local_ids.masked_fill(outside, 0), self.weight)
        return tp_all_reduce(embeddings.masked_fill(outside.unsqueeze(-1), 0))


class LMHead(VocabEmbedding):
    """hidden [N, H] -> logits [N, vocab] in float32 (what the sampler expects).

    ``packed``: the table pre-packed for the CPU's bf16/fp16 matmul (layers/cpu_linear.py), or None.
    """

    packed = None

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
        if self.packed is not None:
            logits = self.packed.linear(hidden_states, self.bias).float()
        else:
            logits = F.linear(hidden_states, self.weight, self.bias).float()
        if self.tp_size == 1:
            return logits
        return tp_all_gather(logits, dim=-1)[..., :self.num_embeddings]
