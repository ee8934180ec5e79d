"""EAGLE-3 proposals: a one-layer head over three of the *target's* layers, guessing in a draft vocabulary.

Checkpoint (the authors' layout, e.g. EAGLE3-LLaMA3.1-Instruct-8B; config.json a Llama config with
num_hidden_layers 1, ``draft_vocab_size``, optional ``target_hidden_size`` and
``eagle_aux_hidden_state_layer_ids``, the latter possibly inside ``eagle_config``):

    fc.weight [H, 3 T]                  over the target's aux hidden states, concatenated low layer to high
    midlayer.* (or layers.0.*)          input_layernorm (on the embeddings), hidden_norm (on the hidden input),
                                        self_attn.{q,k,v}_proj over 2H, o_proj, post_attention_layernorm, mlp.*
    norm.weight, lm_head.weight [V_draft, H]
    d2t [V_draft]                       target id = draft id + d2t[draft id] (needed when V_draft < vocab_size)
    embed_tokens.weight                 optional: the target's embedding otherwise (t2d is not needed)

The target's aux state of layer i is the residual stream entering layer i (layer 0's: the embedding): the
target writes them into a static buffer during its forward (``LlamaForCausalLM.capture_aux_hidden_states``),
and ``after_forward`` turns the step's rows into the head's hidden input at once, ``fc(aux)``.

    one pass:  x = cat(input_layernorm(embed(token)), hidden_norm(h_in))      residual = h_in
               out = mlp(post_attention_layernorm(attn(x), residual)) + residual      (pre-norm)
               guess = d2t-map(argmax lm_head(norm(out)))
    pair p of a request: h_in = fc(aux at p), token p + 1; each later draft step: h_in = the previous ``out``

Everything else is EAGLE's (eagle.py): the head's paged KV under the target's block ids, pairs run once their
next token is verified, the decode loop into the lookahead slots.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sluice.models.llama import AuxHiddenStates, LlamaDecoderLayer
from sluice.sample.argmax import row_argmax
from sluice.spec_decode.eagle import EagleProposer, load_head_weights, read_eagle_weights

if TYPE_CHECKING:
    from sluice.worker.input_batch import StepInputs
    from sluice.worker.model_runner import ModelRunner


class Eagle3DecoderLayer(LlamaDecoderLayer):
    """A Llama decoder layer whose attention reads [normed embeddings, normed hidden input] (2H wide)."""

    def __init__(self, config: Any, attn_backend: Any) -> None:
        from sluice.layers.linear import QKVParallelLinear
        from sluice.layers.norm import RMSNorm
        from sluice.models.llama import LlamaForCausalLM
        from sluice.models.model_config import hf_num_kv_heads
        super().__init__(config, LlamaForCausalLM.make_attention(config, attn_backend))
        attn = self.self_attn
        attn.qkv_proj = QKVParallelLinear(2 * config.hidden_size, attn.head_dim, config.num_attention_heads,
                                          hf_num_kv_heads(config), bias=bool(getattr(config, "attention_bias", False)))
        self.hidden_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Some checkpoints were trained with the residual taken after hidden_norm (vLLM's norm_before_residual).
        self.norm_before_residual = bool(getattr(config, "norm_before_residual", False))

    def forward(self, positions: torch.Tensor, embeddings: torch.Tensor, hidden_in: torch.Tensor,
                attn_metadata: Any) -> torch.Tensor:
        """-> the layer's output before the final norm (the next draft step's hidden input)."""
        normed_hidden = self.hidden_norm(hidden_in)
        residual = normed_hidden if self.norm_before_residual else hidden_in
        x = torch.cat([self.input_layernorm(embeddings), normed_hidden], dim=-1)
        x = self.self_attn(positions, x, attn_metadata)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x) + residual


class Eagle3Head(nn.Module):
    """fc (over the aux states, applied by ``combine``) -> one Eagle3DecoderLayer -> norm -> the draft lm_head."""

    def __init__(self, config: Any, num_aux_layers: int, target_hidden_size: int, dtype: torch.dtype,
                 device: torch.device, attn_backend: Any, own_embedding: bool) -> None:
        super().__init__()
        from sluice.layers.norm import RMSNorm
        from sluice.layers.vocab import LMHead, VocabEmbedding
        from sluice.models.llama import _construction_defaults
        hidden = config.hidden_size
        self.draft_vocab_size = getattr(config, "draft_vocab_size", None) or config.vocab_size
        with _construction_defaults(dtype, device):
            self.fc = nn.Linear(num_aux_layers * target_hidden_size, hidden, bias=False)
            self.midlayer = Eagle3DecoderLayer(config, attn_backend)
            self.norm = RMSNorm(hidden, config.rms_norm_eps)
            self.lm_head = LMHead(self.draft_vocab_size, hidden)
            self.embed_tokens = VocabEmbedding(config.vocab_size, hidden) if own_embedding else None
        # draft id -> target id (identity until d2t loads)
        self.register_buffer("draft_to_target", torch.arange(self.draft_vocab_size, device=device), persistent=False)

    def combine(self, aux_hidden_states: torch.Tensor) -> torch.Tensor:
        """The target's aux states [T, n * T_H] -> the head's hidden input [T, H] (first pass only)."""
        return self.fc(aux_hidden_states)

    def forward(self, embeddings: torch.Tensor, hidden_in: torch.Tensor, positions: torch.Tensor,
                metadata: Any) -> torch.Tensor:
        return self.midlayer(positions, embeddings, hidden_in.to(embeddings.dtype), metadata)

    def next_tokens(self, out: torch.Tensor) -> torch.Tensor:
        """Pre-norm outputs [N, H] -> the guessed target token ids [N]: argmax over the draft vocabulary."""
        logits = self.lm_head(self.norm(out))
        return self.draft_to_target[row_argmax(logits.to(torch.float32))]

    def load_weights(self, weights: dict[str, torch.Tensor], vocab_size: int) -> None:
        """Loads the head; d2t becomes ``draft_to_target`` (checked against the target's ``vocab_size``)."""
        weights = {_param_name(name): tensor for name, tensor in weights.items()}
        weights.pop("t2d", None)
        self._load_draft_to_target(weights.pop("d2t", None), vocab_size)
        check_eagle3_weights(weights, self.fc.in_features, self.fc.out_features, self.draft_vocab_size)
        load_head_weights(self, weights, "EAGLE-3", "fc, midlayer.* or layers.0.*, norm, lm_head, d2t, t2d, "
                                                    "embed_tokens")

    def _load_draft_to_target(self, d2t: torch.Tensor | None, vocab_size: int) -> None:
        if d2t is None:
            if self.draft_vocab_size != vocab_size:
                raise ValueError(f"EAGLE-3 checkpoint has draft_vocab_size {self.draft_vocab_size} < vocab_size "
                                 f"{vocab_size} but no d2t tensor mapping draft ids to target ids")
            return
        if tuple(d2t.shape) != (self.draft_vocab_size,):
            raise ValueError(f"EAGLE-3 checkpoint's d2t has shape {tuple(d2t.shape)}, expected "
                             f"({self.draft_vocab_size},) (draft_vocab_size)")
        target_ids = torch.arange(self.draft_vocab_size) + d2t.to(torch.long)
        if target_ids.min() < 0 or target_ids.max() >= vocab_size:
            raise ValueError(f"EAGLE-3 checkpoint's d2t maps draft ids outside the target's vocabulary "
                             f"(0..{vocab_size - 1})")
        self.draft_to_target.copy_(target_ids)


def _param_name(checkpoint_name: str) -> str:
    """A checkpoint tensor's name in the head: no ``model.`` prefix, the decoder layer as ``midlayer``."""
    name = checkpoint_name.removeprefix("model.")
    return "midlayer." + name.removeprefix("layers.0.") if name.startswith("layers.0.") else name


def check_eagle3_weights(weights: dict[str, torch.Tensor], fc_width: int, hidden_size: int,
                         draft_vocab_size: int) -> None:
    """Shape checks with messages that say what the head expects (the loaders would only name a shape)."""
    fc = weights.get("fc.weight")
    if fc is not None and tuple(fc.shape) != (hidden_size, fc_width):
        raise ValueError(f"EAGLE-3 checkpoint's fc.weight has shape {tuple(fc.shape)}, expected "
                         f"({hidden_size}, {fc_width}): hidden_size by the aux layers times the target's hidden_size")
    lm_head = weights.get("lm_head.weight")
    if lm_head is not None and lm_head.shape[0] != draft_vocab_size:
        raise ValueError(f"EAGLE-3 checkpoint's lm_head.weight has {lm_head.shape[0]} rows, expected "
                         f"draft_vocab_size {draft_vocab_size}")


class Eagle3Proposer(EagleProposer):
    """EAGLE's proposer (pairs, KV, decode loop) with EAGLE-3's head: fc over the target's aux states, its own
    norm and draft-vocabulary lm_head."""

    def load(self, runner: "ModelRunner") -> None:
        hf, target = self.config.draft_hf_config, runner.model
        if not hasattr(target, "capture_aux_hidden_states"):
            raise ValueError(f"speculative_config.method eagle3 needs the target's per-layer hidden states, which "
                             f"{type(target).__name__} does not expose (Llama-family models do)")
        weights = {_param_name(k): v for k, v in read_eagle_weights(self.config.model).items()}
        own_embedding = "embed_tokens.weight" in weights
        target_hidden_size = runner.model_config.hf_config.hidden_size
        if not own_embedding and hf.hidden_size != target_hidden_size:
            raise ValueError(f"speculative_config.model {self.config.model!r}: an EAGLE-3 head of hidden_size "
                             f"{hf.hidden_size} without embed_tokens cannot use the target's embedding "
                             f"(hidden_size {target_hidden_size})")
        layer_ids = self.config.aux_hidden_state_layer_ids
        self.model = Eagle3Head(hf, len(layer_ids), target_hidden_size, runner.dtype, runner.device,
                                runner.attn_backend, own_embedding)
        self.model.load_weights(weights, hf.vocab_size)
        self.model.eval()
        self._target = target
        # Sized for the largest forward the runner makes (a padded CUDA graph bucket included).
        self._aux: AuxHiddenStates = target.capture_aux_hidden_states(layer_ids, runner.step_buffers.max_num_tokens)
        self._init_kv_spec(hf, runner)

    def after_forward(self, runner: "ModelRunner", inputs: "StepInputs", hidden: torch.Tensor) -> None:
        # fc right away: queued after the forward (or graph replay) that wrote the buffer, before any other does.
        super().after_forward(runner, inputs, self.model.combine(self._aux.buffer[:len(inputs.input_ids)]))

    def _next_tokens(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.next_tokens(features)
