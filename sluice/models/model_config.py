"""ModelConfig: what the engine needs to know about a checkpoint before loading its weights.

Resolves the model path (the embedded default when none is given), reads the HF config
(config.json, or a GGUF file's metadata), the runtime dtype and ``max_model_len``, and the
attention windows of its layers (``layer_sliding_windows``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from sluice.config import EngineArgs


@dataclass(frozen=True)
class ModelConfig:
    model: str
    tokenizer: str
    served_model_name: str
    hf_config: Any  # transformers.PretrainedConfig
    dtype: str  # "float32" | "bfloat16" | "float16"
    device: str  # "cpu" | "cuda"
    max_model_len: int
    vocab_size: int
    is_gguf: bool
    load_format: str
    seed: int

    @property
    def num_layers(self) -> int:
        return self.hf_config.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.hf_config, "num_key_value_heads", None) or self.hf_config.num_attention_heads

    @property
    def head_dim(self) -> int:
        head_dim = getattr(self.hf_config, "head_dim", None)
        return head_dim or self.hf_config.hidden_size // self.hf_config.num_attention_heads

    @property
    def context_length(self) -> int:
        return model_context_length(self.hf_config)

    @property
    def kv_sliding_window(self) -> int | None:
        """The window the KV cache manager may free blocks behind: set only when every layer has one."""
        return kv_sliding_window(self.hf_config)

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "ModelConfig":
        import torch

        from sluice.models.loader import load_hf_config, resolve_dtype

        model = args.model
        if model is None:
            from sluice.models.default_model import default_model_path
            model = default_model_path()
        if not os.path.exists(model):
            raise FileNotFoundError(
                f"model path {model!r} does not exist (sluice loads local HF folders and .gguf files; "
                "nothing is downloaded)")
        is_gguf = model.endswith(".gguf") or args.load_format == "gguf"
        if is_gguf:
            from sluice.models.gguf_loader import GGUFCheckpoint
            hf_config = GGUFCheckpoint(model).hf_config
        else:
            hf_config = load_hf_config(model)
        device = args.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = resolve_dtype(hf_config, args.dtype, device)
        context_length = model_context_length(hf_config)
        max_model_len = args.max_model_len or context_length
        if max_model_len > context_length:
            raise ValueError(f"max_model_len {max_model_len} exceeds the model's context length {context_length}")
        # Rope settings that depend on the serving length read it here (longrope's factor set).
        hf_config.sluice_max_model_len = max_model_len
        return cls(
            model=model,
            tokenizer=args.tokenizer or model,
            served_model_name=args.served_model_name or _default_served_name(args.model, model),
            hf_config=hf_config,
            dtype=str(dtype).removeprefix("torch."),
            device=device,
            max_model_len=max_model_len,
            vocab_size=hf_config.vocab_size,
            is_gguf=is_gguf,
            load_format=args.load_format,
            seed=args.seed,
        )


def model_context_length(hf_config: Any) -> int:
    """max_position_embeddings, stretched by the rope scaling factor where vLLM stretches it (yarn, dynamic, linear)."""
    from sluice.layers.rope_scaling import RopeSettings

    if getattr(hf_config, "max_position_embeddings", None) is None:
        return 2048
    return RopeSettings.from_hf_config(hf_config).context_length()


def layer_sliding_windows(hf_config: Any) -> list[int | None]:
    """Each layer's attention window (None: full attention), as transformers' models read the config.

    ``layer_types`` names each layer (Gemma 2/3, Qwen2 with use_sliding_window); without it, a
    ``sliding_window`` applies to every layer (Mistral, Phi-3) unless ``use_sliding_window`` is False.
    """
    window = getattr(hf_config, "sliding_window", None)
    num_layers = hf_config.num_hidden_layers
    layer_types = getattr(hf_config, "layer_types", None)
    if window is None or getattr(hf_config, "use_sliding_window", True) is False:
        return [None] * num_layers
    if layer_types:
        return [window if layer_type == "sliding_attention" else None for layer_type in layer_types[:num_layers]]
    return [window] * num_layers


def kv_sliding_window(hf_config: Any) -> int | None:
    """The largest window when every layer is windowed (KV behind it is dead for all layers), else None."""
    windows = layer_sliding_windows(hf_config)
    if not windows or any(w is None for w in windows):
        return None
    return max(windows)


def _default_served_name(given: str | None, resolved: str) -> str:
    if given is None:
        from sluice.models.default_model import DEFAULT_MODEL_NAME
        return DEFAULT_MODEL_NAME
    return given
