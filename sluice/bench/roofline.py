"""Roofline lower bound of an offline workload, and the fraction of it a measured run reaches.

docs/benchmarks.md, "Limits": a decode step cannot be faster than reading the weights plus the KV it attends to
from HBM, and a prefill cannot be faster than its FLOPs at peak. For a whole offline run::

    prefill_s = (2 * matmul_params * prefill_tokens + attention_flops) / peak_flops
                 attention_flops = 4 * num_heads * head_dim * num_layers * sum over prefill tokens of their context
    decode_s  = (sum over decode steps of weight_bytes(batch) + kv_bytes_read) / hbm_bytes_per_s
                 decode steps    = the run's own, by batch (output tokens in the step), when it recorded them;
                                   else output_tokens / avg_batch steps at avg_batch
                 weight_bytes    = bytes of every weight a step reads (the input embedding is gathered, not read,
                                   unless it is tied to the LM head; MoE: the experts hit, see below)
                 kv_bytes_read   = kv_bytes_per_token * sum over output tokens of their context length
    lower_bound_s      = prefill_s + decode_s
    roofline_fraction  = lower_bound_s / measured_s                  (1.0 = at the roofline)

``prefill_tokens`` counts only the prompt tokens that must be computed: with prefix caching on, full blocks
already seen in an earlier prompt are free (``count_prefill_tokens``). Defaults are the H100 SXM constants
measured for docs/benchmarks.md (copy 3.0 TB/s, bf16 matmul 800 TFLOP/s); pass others for other devices. The model
shape is that of a Llama-family decoder (Llama, Mistral, Qwen2/3), dense or mixture-of-experts (Mixtral,
Qwen2/3-MoE): a token multiplies through ``num_experts_per_tok`` experts, and a decode step of B sequences reads
the experts they hit, E * (1 - (1 - k / E) ** B) per layer under uniform routing (``step_weight_bytes``). That is
concave in B, so a MoE bound needs each step's batch: at the average batch it overstates the bytes of a run whose
batch varies (and a run could beat its "lower bound").
Every layer counts as sparse (``mlp_only_layers`` and ``decoder_sparse_step`` are not modelled).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

H100_HBM_BYTES_PER_S = 3.0e12
H100_PEAK_FLOPS = 800e12


@dataclass(frozen=True, slots=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    dtype_bytes: int
    num_experts: int = 0  # 0: dense; else each layer's MLP is a mixture of experts (plus a dense
    num_experts_per_tok: int = 0  # shared part of ``intermediate_size``, 0 where there is none)
    moe_intermediate_size: int = 0
    kv_dtype_bytes: int = 0  # bytes per KV element (--kv-cache-dtype fp8: 1); 0: dtype_bytes

    @classmethod
    def from_hf_config(cls, hf_config: Any, dtype_bytes: int) -> "ModelShape":
        text_config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
        num_heads = text_config.num_attention_heads
        num_experts = getattr(text_config, "num_experts", None) or getattr(text_config, "num_local_experts", None) or 0
        moe = dict(intermediate_size=text_config.intermediate_size)
        if num_experts:  # Mixtral's experts are intermediate_size wide; Qwen-MoE's dense part is the shared expert
            moe = dict(num_experts=num_experts, num_experts_per_tok=text_config.num_experts_per_tok,
                       moe_intermediate_size=getattr(text_config, "moe_intermediate_size", None)
                       or text_config.intermediate_size,
                       intermediate_size=getattr(text_config, "shared_expert_intermediate_size", None) or 0)
        return cls(
            num_layers=text_config.num_hidden_layers,
            hidden_size=text_config.hidden_size,
            num_heads=num_heads,
            num_kv_heads=getattr(text_config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(text_config, "head_dim", None) or text_config.hidden_size // num_heads,
            vocab_size=text_config.vocab_size,
            tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
            dtype_bytes=dtype_bytes,
            **moe,
        )

    @property
    def layer_params(self) -> int:
        h, d = self.hidden_size, self.head_dim
        attention = h * self.num_heads * d * 2 + h * self.num_kv_heads * d * 2  # q, o; k, v
        mlp = 3 * h * self.intermediate_size  # gate, up, down
        experts = self.num_experts_per_tok * self.expert_params + h * self.num_experts  # routed experts, router
        return attention + mlp + experts + 2 * h  # two RMSNorms

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden_size * self.moe_intermediate_size

    @property
    def matmul_params(self) -> int:
        """Parameters each token multiplies through: every layer plus the LM head."""
        return self.num_layers * self.layer_params + self.hidden_size + self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        embedding = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        idle_experts = self.num_layers * (self.num_experts - self.num_experts_per_tok) * self.expert_params
        return self.matmul_params + embedding + idle_experts

    @property
    def decode_weight_bytes(self) -> int:
        """Weight bytes of a one-sequence decode step (MoE: its num_experts_per_tok experts per layer)."""
        return self.matmul_params * self.dtype_bytes

    def step_weight_bytes(self, batch: float) -> float:
        """Weight bytes a decode step of ``batch`` sequences reads: dense models read every weight; MoE
        layers read the experts the batch is expected to hit under uniform routing."""
        if not self.num_experts:
            return self.decode_weight_bytes
        hit = self.num_experts * (1 - (1 - self.num_experts_per_tok / self.num_experts) ** batch)
        extra = self.num_layers * (max(hit, self.num_experts_per_tok) - self.num_experts_per_tok) * self.expert_params
        return self.decode_weight_bytes + extra * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * (self.kv_dtype_bytes or self.dtype_bytes)


@dataclass(frozen=True, slots=True)
class Roofline:
    hbm_bytes_per_s: float
    peak_flops: float
    avg_batch: float
    prefill_s: float
    decode_s: float

    @property
    def lower_bound_s(self) -> float:
        return self.prefill_s + self.decode_s

    def fraction(self, measured_s: float) -> float:
        return self.lower_bound_s / measured_s if measured_s > 0 else 0.0

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "lower_bound_s": self.lower_bound_s}


def count_prefill_tokens(prompts: Sequence[Sequence[int]], block_size: int, prefix_caching: bool) -> int:
    """Prompt tokens that must be computed; with prefix caching, full blocks seen before are skipped."""
    if not prefix_caching:
        return sum(len(p) for p in prompts)
    seen: set[tuple] = set()
    computed = 0
    for prompt in prompts:
        parent: tuple = ()
        hits, missed = 0, False
        for start in range(0, len(prompt) - block_size + 1, block_size):
            # A block's key chains its parent's, as the engine's block hash does.
            parent = (hash(parent), tuple(prompt[start:start + block_size]))
            if parent in seen and not missed:
                hits += 1
            else:
                missed = True
                seen.add(parent)
        # The engine caps a hit one token short: the last prompt token always runs.
        computed += len(prompt) - min(hits * block_size, len(prompt) - 1)
    return computed


def workload_roofline(shape: ModelShape, prompt_lens: Sequence[int], output_lens: Sequence[int],
                      avg_batch: float, prefill_tokens: int | None = None,
                      hbm_bytes_per_s: float = H100_HBM_BYTES_PER_S,
                      peak_flops: float = H100_PEAK_FLOPS,
                      decode_batches: Mapping[int, int] | None = None) -> Roofline:
    """The lower bound of running these requests (formula: module doc). ``decode_batches``: the run's decode
    steps as {output tokens in the step: number of steps}; without it, every step runs at ``avg_batch``."""
    if avg_batch <= 0:
        raise ValueError(f"avg_batch must be positive, got {avg_batch}")
    if hbm_bytes_per_s <= 0 or peak_flops <= 0:
        raise ValueError("hbm_bytes_per_s and peak_flops must be positive")
    total_prompt = sum(prompt_lens)
    prefill_tokens = total_prompt if prefill_tokens is None else prefill_tokens
    # Attention context of the computed prompt tokens: p*(p+1)/2 per prompt, scaled by the computed share.
    context_sum = sum(p * (p + 1) / 2 for p in prompt_lens) * (prefill_tokens / max(total_prompt, 1))
    attention_flops = 4 * shape.num_heads * shape.head_dim * shape.num_layers * context_sum
    prefill_s = (2 * shape.matmul_params * prefill_tokens + attention_flops) / peak_flops
    # Output token t (1-based) of a request with prompt p attends to p + t - 1 tokens.
    kv_tokens_read = sum(o * p + o * (o - 1) / 2 for p, o in zip(prompt_lens, output_lens))
    if decode_batches:
        weight_bytes = sum(steps * shape.step_weight_bytes(batch) for batch, steps in decode_batches.items())
    else:
        weight_bytes = sum(output_lens) / avg_batch * shape.step_weight_bytes(avg_batch)
    decode_bytes = weight_bytes + kv_tokens_read * shape.kv_bytes_per_token
    return Roofline(hbm_bytes_per_s, peak_flops, avg_batch, prefill_s, decode_bytes / hbm_bytes_per_s)
