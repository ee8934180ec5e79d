"""ModelConfig: what the engine needs to know about a checkpoint before loading its weights.

Resolves the model path (the embedded default when none is given), reads the HF config
(config.json, or a GGUF file's metadata), the runtime dtype and ``max_model_len``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from sluice.config import EngineArgs
from sluice.pooling.config import PoolerConfig, resolve_pooler_config


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
    # Set for pooling (embedding) engines: --runner pooling / --task embed, or a sentence-transformers folder.
    pooler_config: PoolerConfig | None = None

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
        return int(getattr(self.hf_config, "max_position_embeddings", 0) or 2048)

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
        context_length = int(getattr(hf_config, "max_position_embeddings", 0) or 2048)
        max_model_len = args.max_model_len or context_length
        if max_model_len > context_length:
            raise ValueError(f"max_model_len {max_model_len} exceeds the model's context length {context_length}")
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
            pooler_config=resolve_pooler_config(args.runner, args.task, model, hf_config),
        )


def _default_served_name(given: str | None, resolved: str) -> str:
    if given is None:
        from sluice.models.default_model import DEFAULT_MODEL_NAME
        return DEFAULT_MODEL_NAME
    return given
