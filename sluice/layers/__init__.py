"""Model building blocks shared by every family: linear (self-loading weights), norm, rotary,
activation, vocab (embedding / LM head) and the paged attention layer."""
from sluice.layers.activation import SiluAndMul
from sluice.layers.attention import Attention, bind_kv_cache
from sluice.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear,
                                  ReplicatedLinear, RowParallelLinear, default_weight_loader)
from sluice.layers.norm import RMSNorm
from sluice.layers.rotary import RopeSettings, RotaryEmbedding, get_rope
from sluice.layers.vocab import LMHead, VocabEmbedding

__all__ = ["Attention", "ColumnParallelLinear", "LMHead", "MergedColumnParallelLinear", "QKVParallelLinear",
           "ReplicatedLinear", "RMSNorm", "RopeSettings", "RotaryEmbedding", "RowParallelLinear", "SiluAndMul",
           "VocabEmbedding", "bind_kv_cache", "default_weight_loader", "get_rope"]
