"""HF architecture name (``config.architectures[0]``) -> sluice model class.

Classes are imported lazily so that listing or checking architectures costs no model imports.
"""
from __future__ import annotations

import importlib
from typing import Any

# architecture -> (module under sluice.models, class name)
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
    "Gemma2ForCausalLM": ("gemma2", "Gemma2ForCausalLM"),
    "Gemma3ForCausalLM": ("gemma3", "Gemma3ForCausalLM"),
    "Phi3ForCausalLM": ("phi3", "Phi3ForCausalLM"),
    "MixtralForCausalLM": ("mixtral", "MixtralForCausalLM"),
    "Qwen2MoeForCausalLM": ("qwen2_moe", "Qwen2MoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("qwen3_moe", "Qwen3MoeForCausalLM"),
}
# Configs built in code (not read from config.json) have no ``architectures``; their model_type decides.
_MODEL_TYPES: dict[str, str] = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def resolve_model_class(architecture: str) -> type:
    if architecture not in _MODELS:
        raise ValueError(f"architecture {architecture!r} is not supported; supported: "
                         f"{', '.join(supported_architectures())}")
    module_name, class_name = _MODELS[architecture]
    return getattr(importlib.import_module(f"sluice.models.{module_name}"), class_name)


def get_model_class(hf_config: Any) -> type:
    """The class for the first architecture of ``hf_config.architectures`` that sluice knows.

    Without ``architectures``, the ``model_type`` picks the family's causal-LM class.
    """
    architectures = list(getattr(hf_config, "architectures", None) or [])
    if not architectures:
        model_type = getattr(hf_config, "model_type", None)
        if model_type in _MODEL_TYPES:
            return resolve_model_class(_MODEL_TYPES[model_type])
        raise ValueError(f"architectures is missing from the model config and model_type {model_type!r} is not "
                         f"known; supported architectures: {', '.join(supported_architectures())}")
    for architecture in architectures:
        if architecture in _MODELS:
            return resolve_model_class(architecture)
    raise ValueError(f"architectures {architectures} are not supported; supported: "
                     f"{', '.join(supported_architectures())}")
