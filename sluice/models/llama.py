"""Llama (and Mistral): the decoder blocks every family here builds on.

    input_ids -> embed_tokens -> N x [input_layernorm -> self_attn -> post_attention_layernorm -> mlp] -> norm
              -> (compute_logits) lm_head -> float32 logits

Residual adds are fused into the norms (``norm(x, residual)``). Families differ only in their
attention block, chosen by ``LlamaForCausalLM.make_attention`` (Qwen2: qkv bias; Qwen3: per-head
q/k norms). All tokens of a step are packed in one flat dimension [T]; attention metadata says
which request each token belongs to.
"""
from __future__ import annotations

import logging
from collections import Counter
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from sluice.attention.backend import AttentionBackend, AttentionMetadata
from sluice.layers.activation import SiluAndMul
from sluice.layers.attention import Attention
from sluice.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear, default_weight_loader
from sluice.layers.norm import RMSNorm
from sluice.layers.rotary import get_rope
from sluice.layers.vocab import LMHead, VocabEmbedding
from sluice.models.model_config import hf_head_dim as get_head_dim
from sluice.models.model_config import hf_num_kv_heads as get_num_kv_heads

logger = logging.getLogger(__name__)


class LlamaAttention(nn.Module):
    def __init__(self, config: Any, attn_backend: AttentionBackend, qkv_bias: bool, o_bias: bool) -> None:
        super().__init__()
        self.head_dim = get_head_dim(config)
        num_heads, num_kv_heads = config.num_attention_heads, get_num_kv_heads(config)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, num_heads, num_kv_heads, bias=qkv_bias)
        self.o_proj = RowParallelLinear(num_heads * self.head_dim, config.hidden_size, bias=o_bias)
        self.rotary_emb = get_rope(self.head_dim, config)
        self.attn = Attention(self.qkv_proj.num_heads, self.head_dim, self.head_dim ** -0.5,
                              self.qkv_proj.num_kv_heads, attn_backend)

    def project_qkv(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden [T, hidden] -> q [T, H * D], k and v [T, Hkv * D], before rope."""
        return self.qkv_proj(hidden_states).split(self.qkv_proj.output_sizes, dim=-1)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.project_qkv(hidden_states)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, attn_metadata))


class LlamaMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, bias=bias)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, self_attn: nn.Module) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size, bias=getattr(config, "mlp_bias", False))
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
                attn_metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, hidden_states = hidden_states, self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, attn_metadata)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class LlamaModel(nn.Module):
    def __init__(self, config: Any, layers: list[LlamaDecoderLayer]) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        hidden_states, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual, attn_metadata)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


@contextmanager
def _construction_defaults(dtype: torch.dtype, device: torch.device) -> Iterator[None]:
    """Creates parameters directly in ``dtype`` on ``device``: no float32 CPU copy first."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


class LlamaForCausalLM(nn.Module):
    # checkpoint name -> (our merged parameter name, shard id)
    stacked_params_mapping: list[tuple[str, str, str | int]] = [
        (".qkv_proj", ".q_proj", "q"), (".qkv_proj", ".k_proj", "k"), (".qkv_proj", ".v_proj", "v"),
        (".gate_up_proj", ".gate_proj", 0), (".gate_up_proj", ".up_proj", 1),
    ]

    def __init__(self, hf_config: Any, dtype: torch.dtype, device: torch.device | str,
                 attn_backend: AttentionBackend) -> None:
        super().__init__()
        self.config = hf_config
        self.dtype, self.device = dtype, torch.device(device)
        _warn_if_sliding_window(hf_config)
        with _construction_defaults(dtype, self.device):
            layers = [LlamaDecoderLayer(hf_config, self.make_attention(hf_config, attn_backend))
                      for _ in range(hf_config.num_hidden_layers)]
            self.model = LlamaModel(hf_config, layers)
            self.lm_head = LMHead(hf_config.vocab_size, hf_config.hidden_size)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)

    @classmethod
    def make_attention(cls, config: Any, attn_backend: AttentionBackend) -> nn.Module:
        bias = bool(getattr(config, "attention_bias", False))
        return LlamaAttention(config, attn_backend, qkv_bias=bias, o_bias=bias)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T] (packed tokens of all requests) -> hidden states [T, hidden]."""
        return self.model(input_ids, positions, attn_metadata)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] (usually each request's last token) -> float32 logits [N, vocab]."""
        return self.lm_head(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Loads HF-named tensors; returns the names of the parameters filled.

        Raises ValueError on a tensor that matches no parameter, and on parameters (or shards
        of merged ones) that the checkpoint never provided.
        """
        params = dict(self.named_parameters())  # a tied lm_head is listed once, as the embedding
        shards_loaded: Counter[str] = Counter()
        for name, loaded_weight in weights:
            if "rotary_emb.inv_freq" in name or (self.tie_word_embeddings and name.startswith("lm_head.")):
                continue
            param_name, shard_id = self._param_for(name)
            if param_name not in params:
                raise ValueError(f"checkpoint tensor {name!r} matches no parameter of {type(self).__name__}")
            param = params[param_name]
            weight_loader = getattr(param, "weight_loader", default_weight_loader)
            weight_loader(param, loaded_weight, shard_id)
            shards_loaded[param_name] += 1
        missing = sorted(n for n, p in params.items() if shards_loaded[n] < getattr(p, "num_shards", 1))
        if missing:
            raise ValueError(f"checkpoint is missing tensors for {len(missing)} parameters: {', '.join(missing[:8])}"
                             + (" ..." if len(missing) > 8 else ""))
        return set(shards_loaded)

    def _param_for(self, checkpoint_name: str) -> tuple[str, str | int | None]:
        for param_part, weight_part, shard_id in self.stacked_params_mapping:
            if weight_part in checkpoint_name:
                return checkpoint_name.replace(weight_part, param_part), shard_id
        return checkpoint_name, None


def _warn_if_sliding_window(config: Any) -> None:
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:  # Qwen2 configs carry a window they do not use
        return
    layer_types = getattr(config, "layer_types", None) or []
    uses_window = "sliding_attention" in layer_types or (window is not None and not layer_types)
    if uses_window and window < getattr(config, "max_position_embeddings", 0):
        logger.warning("sliding_window=%d is not applied: attention is full, which matches the checkpoint only "
                       "for sequences up to %d tokens", window, window)


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral checkpoints use Llama's layout and names."""
