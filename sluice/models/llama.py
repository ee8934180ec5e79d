"""Llama (and Mistral): the decoder blocks every family here builds on.

    input_ids -> embed_tokens -> N x [input_layernorm -> self_attn -> post_attention_layernorm -> mlp] -> norm
              -> (compute_logits) lm_head -> float32 logits

Residual adds are fused into the norms (``norm(x, residual)``). Families differ in their
attention block, chosen by ``LlamaForCausalLM.make_attention`` (Qwen2: qkv bias; Qwen3: per-head
q/k norms), or in the whole decoder layer (``make_layer``: Gemma's sandwich norms), the norm class
(``norm_class``), an embedding multiplier and fused checkpoint tensors (``split_fused_weights``:
Phi-3). Each layer's sliding window comes from the config (``hf_layer_sliding_windows``) and is set
on its Attention module. All tokens of a step are packed in one flat dimension [T]; attention
metadata says which request each token belongs to. Mixture-of-experts families choose their feed-forward
block with ``make_mlp``.
"""
from __future__ import annotations

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
from sluice.layers.rotary import RotaryEmbedding, get_rope
from sluice.layers.vocab import LMHead, VocabEmbedding
from sluice.models.model_config import hf_head_dim as get_head_dim
from sluice.models.model_config import hf_layer_sliding_windows
from sluice.models.model_config import hf_num_kv_heads as get_num_kv_heads


class LlamaAttention(nn.Module):
    """qkv projection, rope, paged attention, o projection. ``scale`` defaults to head_dim ** -0.5,
    ``rotary_emb`` to the config's rope."""

    def __init__(self, config: Any, attn_backend: AttentionBackend, qkv_bias: bool, o_bias: bool,
                 scale: float | None = None, rotary_emb: RotaryEmbedding | None = None,
                 logits_soft_cap: float | None = None) -> None:
        super().__init__()
        self.head_dim = get_head_dim(config)
        num_heads, num_kv_heads = config.num_attention_heads, get_num_kv_heads(config)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, num_heads, num_kv_heads, bias=qkv_bias)
        self.o_proj = RowParallelLinear(num_heads * self.head_dim, config.hidden_size, bias=o_bias)
        self.rotary_emb = rotary_emb if rotary_emb is not None else get_rope(self.head_dim, config)
        self.attn = Attention(self.qkv_proj.num_heads, self.head_dim, scale or self.head_dim ** -0.5,
                              self.qkv_proj.num_kv_heads, attn_backend, logits_soft_cap=logits_soft_cap)

    def project_qkv(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden [T, hidden] -> q [T, H * D], k and v [T, Hkv * D], before rope."""
        return self.qkv_proj(hidden_states).split(self.qkv_proj.output_sizes, dim=-1)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.project_qkv(hidden_states)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, attn_metadata))


class QKNormAttention(LlamaAttention):
    """LlamaAttention plus a norm over each head of q and of k, applied before rope (Qwen3, Gemma 3)."""

    def __init__(self, config: Any, attn_backend: AttentionBackend, norm_class: type[nn.Module],
                 **attention_kwargs: Any) -> None:
        bias = bool(getattr(config, "attention_bias", False))
        super().__init__(config, attn_backend, qkv_bias=bias, o_bias=bias, **attention_kwargs)
        self.q_norm = norm_class(self.head_dim, config.rms_norm_eps)
        self.k_norm = norm_class(self.head_dim, config.rms_norm_eps)

    def project_qkv(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = super().project_qkv(hidden_states)
        num_tokens = q.shape[0]
        q = self.q_norm(q.reshape(num_tokens, -1, self.head_dim)).view(num_tokens, -1)
        k = self.k_norm(k.reshape(num_tokens, -1, self.head_dim)).view(num_tokens, -1)
        return q, k, v


class LlamaMLP(nn.Module):
    """down(act(gate) * up); ``act_fn`` takes the merged [gate | up] (default SiluAndMul)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False,
                 act_fn: nn.Module | None = None) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, bias=bias)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = act_fn if act_fn is not None else SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, self_attn: nn.Module, mlp: nn.Module | None = None,
                 norm_class: type[nn.Module] = RMSNorm) -> None:
        """``mlp``: the feed-forward block (mixture-of-experts families pass theirs); default the dense one."""
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp if mlp is not None else LlamaMLP(config.hidden_size, config.intermediate_size,
                                                        bias=getattr(config, "mlp_bias", False))
        self.input_layernorm = norm_class(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = norm_class(config.hidden_size, config.rms_norm_eps)

    def input_norm(self, hidden_states: torch.Tensor, residual: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(normed input, residual stream): the first layer starts the stream, later ones add to it."""
        if residual is None:
            return self.input_layernorm(hidden_states), hidden_states
        return self.input_layernorm(hidden_states, residual)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
                attn_metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_states, residual = self.input_norm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, attn_metadata)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class AuxHiddenStates:
    """The residual stream entering chosen layers, for a proposer that reads them (EAGLE-3:
    spec_decode/eagle3.py). Layer ``layer_ids[j]``'s input (hidden + residual; layer 0's is the embedding)
    fills columns ``j * H .. (j + 1) * H`` of the forward's rows in one static buffer::

        buffer [max_num_tokens, len(layer_ids) * H]    row t: [ input of layer_ids[0] | ... | input of layer_ids[-1] ]

    Written in place, never returned: a captured CUDA graph writes the same buffer on every replay, so the rows
    of the step just run are there whichever way it ran (rows past its tokens hold padding or older steps)."""

    def __init__(self, layer_ids: tuple[int, ...], max_num_tokens: int, hidden_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.layer_ids = tuple(layer_ids)
        self.buffer = torch.zeros(max_num_tokens, len(self.layer_ids) * hidden_size, dtype=dtype, device=device)
        self._columns: dict[int, list[torch.Tensor]] = {}
        for j, layer_idx in enumerate(self.layer_ids):
            self._columns.setdefault(layer_idx, []).append(self.buffer[:, j * hidden_size:(j + 1) * hidden_size])

    def record(self, layer_idx: int, hidden_states: torch.Tensor, residual: torch.Tensor | None) -> None:
        for columns in self._columns.get(layer_idx, ()):
            out = columns[:hidden_states.shape[0]]
            if residual is None:
                out.copy_(hidden_states)
            else:
                torch.add(hidden_states, residual, out=out)


class LlamaModel(nn.Module):
    """``embedding_multiplier`` scales the embeddings (Gemma: sqrt(hidden_size)). Built under the model's
    default dtype (_construction_defaults). ``aux_hidden_states``: None unless a proposer asked for the inputs
    of some layers (``LlamaForCausalLM.capture_aux_hidden_states``)."""

    def __init__(self, config: Any, layers: list[nn.Module], norm_class: type[nn.Module] = RMSNorm,
                 embedding_multiplier: float | None = None) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = norm_class(config.hidden_size, config.rms_norm_eps)
        # As transformers: the multiplier rounded to the model dtype (sqrt(3072) is 55.5 in bf16).
        self.embedding_multiplier = None if embedding_multiplier is None else float(
            torch.tensor(embedding_multiplier, dtype=torch.get_default_dtype()))
        self.aux_hidden_states: AuxHiddenStates | None = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        hidden_states, residual = self.embed_tokens(input_ids), None
        if self.embedding_multiplier is not None:
            hidden_states = hidden_states * self.embedding_multiplier
        aux = self.aux_hidden_states
        for i, layer in enumerate(self.layers):
            if aux is not None:
                aux.record(i, hidden_states, residual)
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
    norm_class: type[nn.Module] = RMSNorm
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
        with _construction_defaults(dtype, self.device):
            layers = [self.make_layer(hf_config, attn_backend, i) for i in range(hf_config.num_hidden_layers)]
            self.model = LlamaModel(hf_config, layers, self.norm_class, self.embedding_multiplier(hf_config))
            self.lm_head = LMHead(hf_config.vocab_size, hf_config.hidden_size)
        _set_sliding_windows(layers, hf_config)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)

    @classmethod
    def make_layer(cls, config: Any, attn_backend: AttentionBackend, layer_idx: int) -> nn.Module:
        return LlamaDecoderLayer(config, cls.make_attention(config, attn_backend), cls.make_mlp(config, layer_idx))

    @classmethod
    def make_attention(cls, config: Any, attn_backend: AttentionBackend) -> nn.Module:
        bias = bool(getattr(config, "attention_bias", False))
        return LlamaAttention(config, attn_backend, qkv_bias=bias, o_bias=bias)

    @classmethod
    def make_mlp(cls, config: Any, layer_idx: int) -> nn.Module | None:
        """Layer ``layer_idx``'s feed-forward block; None: the dense ``LlamaMLP``."""
        return None

    @classmethod
    def embedding_multiplier(cls, config: Any) -> float | None:
        return None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T] (packed tokens of all requests) -> hidden states [T, hidden]."""
        return self.model(input_ids, positions, attn_metadata)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] (usually each request's last token) -> float32 logits [N, vocab]."""
        return self.lm_head(hidden_states)

    def capture_aux_hidden_states(self, layer_ids: tuple[int, ...], max_num_tokens: int) -> AuxHiddenStates:
        """From now on every forward writes the inputs of ``layer_ids`` into the returned buffer (EAGLE-3);
        call before CUDA graphs are captured, so they write it too."""
        num_layers = len(self.model.layers)
        if any(not 0 <= i < num_layers for i in layer_ids):
            raise ValueError(f"aux hidden state layer ids {list(layer_ids)} out of range: the model has "
                             f"{num_layers} layers (0..{num_layers - 1})")
        self.model.aux_hidden_states = AuxHiddenStates(layer_ids, max_num_tokens, self.config.hidden_size,
                                                       self.dtype, self.device)
        return self.model.aux_hidden_states

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Loads HF-named tensors; returns the names of the parameters filled.

        Raises ValueError on a tensor that matches no parameter, and on parameters (or shards
        of merged ones) that the checkpoint never provided.
        """
        params = dict(self.named_parameters())  # a tied lm_head is listed once, as the embedding
        shards_loaded: Counter[str] = Counter()
        for name, loaded_weight in self.split_fused_weights(weights):
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

    def split_fused_weights(self, weights: Iterable[tuple[str, torch.Tensor]]
                            ) -> Iterable[tuple[str, torch.Tensor]]:
        """Checkpoint tensors under the names of separate projections; fused families override it."""
        return weights

    def _param_for(self, checkpoint_name: str) -> tuple[str, str | int | None]:
        for param_part, weight_part, shard_id in self.stacked_params_mapping:
            if weight_part in checkpoint_name:
                return checkpoint_name.replace(weight_part, param_part), shard_id
        return checkpoint_name, None


def _set_sliding_windows(layers: list[nn.Module], config: Any) -> None:
    """Gives each layer's Attention its window from the config (None: full attention)."""
    for layer, window in zip(layers, hf_layer_sliding_windows(config)):
        for module in layer.modules():
            if isinstance(module, Attention):
                module.sliding_window = window


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral checkpoints use Llama's layout and names."""
