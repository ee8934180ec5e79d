"""What a tensor-parallel engine (tensor_parallel_size > 1) runs, and what it refuses with a clear error.

Sharded today: the decoder families built from Llama's blocks (Llama, Mistral, Qwen2, Qwen3, Gemma 2/3, Phi-3,
and the mixture-of-experts Mixtral, Qwen2-MoE, Qwen3-MoE: experts split along their intermediate dimension),
unquantized, for generation, with ranks 1..N-1 as processes (mp) or Ray actors (ray). Refused: pipeline parallelism, quantized linear methods, LoRA, pooling (embedding)
engines, GGUF files, and head counts or sizes that do not split evenly across the ranks.
"""
from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sluice.config import EngineArgs, ModelConfig

TP_ARCHITECTURES = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
    "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM",
    # experts split along their intermediate dimension, like the dense MLP
    "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM",
})
EXECUTOR_BACKENDS = ("mp", "ray")


def check_parallel_args(args: "EngineArgs") -> None:
    """The flags' part: what can be refused before the model's config is read."""
    tp = args.tensor_parallel_size
    if tp < 1:
        raise ValueError(f"tensor_parallel_size must be at least 1, got {tp}")
    if tp == 1:
        return
    if args.distributed_executor_backend not in EXECUTOR_BACKENDS:
        raise ValueError(f"distributed_executor_backend must be one of {', '.join(EXECUTOR_BACKENDS)}, "
                         f"got {args.distributed_executor_backend!r}")
    if args.distributed_executor_backend == "ray" and importlib.util.find_spec("ray") is None:
        raise ValueError("distributed_executor_backend 'ray' needs the ray package (pip install \"sluice[ray]\"); "
                         "the default 'mp' needs nothing")
    if args.enable_lora:
        raise ValueError("LoRA (enable_lora) is not supported with tensor_parallel_size > 1")
    if args.quantization is not None:
        raise ValueError(f"quantization {args.quantization!r} is not supported with tensor_parallel_size > 1")
    if getattr(args, "speculative_config", None):
        raise ValueError("speculative decoding (speculative_config) is not supported with tensor_parallel_size > 1")


def check_tp_model(model: "ModelConfig", tp_size: int) -> None:
    """The model's part: its family, quantization and head counts must split over ``tp_size`` ranks."""
    from sluice.layers.linear import check_tp_heads
    from sluice.models.model_config import hf_num_kv_heads
    from sluice.models.registry import get_model_class

    if tp_size == 1:
        return
    hf_config: Any = model.hf_config
    if model.pooler_config is not None:
        raise ValueError("pooling (embedding) engines are not supported with tensor_parallel_size > 1")
    architecture = get_model_class(hf_config).__name__
    if architecture not in TP_ARCHITECTURES:
        raise ValueError(f"{architecture} is not supported with tensor_parallel_size > 1 (supported: "
                         f"{', '.join(sorted(TP_ARCHITECTURES))})")
    if model.is_gguf:
        raise ValueError("GGUF checkpoints are not supported with tensor_parallel_size > 1")
    if getattr(hf_config, "quantization_config", None):
        raise ValueError("quantized checkpoints are not supported with tensor_parallel_size > 1")
    check_tp_heads(hf_config.num_attention_heads, hf_num_kv_heads(hf_config), tp_size)
    for name in ("hidden_size", "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size"):
        size = getattr(hf_config, name, None)
        if size is not None and size % tp_size:
            raise ValueError(f"tensor_parallel_size {tp_size} must divide {name} ({size})")


def per_rank_heads(num_heads: int, num_kv_heads: int, tp_size: int) -> tuple[int, int]:
    """(query heads, KV heads) one rank holds: KV heads are split, or replicated when fewer than the ranks."""
    return num_heads // tp_size, max(1, num_kv_heads // tp_size)
