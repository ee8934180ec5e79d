"""What a checkpoint says about itself, read before any weight is loaded.

``read_checkpoint`` resolves the model path (the embedded default when none is given) and reads its HF
config (config.json, or a GGUF file's metadata). The ``hf_*`` functions are the one place that reads
shapes, the context length and the layers' attention windows from an HF config (sluice/config.py's
ModelConfig and the model classes use them). Nothing here imports torch or sluice.config: the one resolved
configuration lives in sluice/config.py and calls in.
"""
from __future__ import annotations

import copy
import os
from typing import Any


def hf_head_dim(hf_config: Any) -> int:
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def hf_num_kv_heads(hf_config: Any) -> int:
    return getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads


def hf_context_length(hf_config: Any) -> int:
    """max_position_embeddings, stretched by the rope scaling factor where vLLM stretches it (yarn, dynamic, linear)."""
    from sluice.layers.rope_scaling import RopeSettings

    if getattr(hf_config, "max_position_embeddings", None) is None:
        return 2048
    return RopeSettings.from_hf_config(hf_config).context_length()


def hf_layer_sliding_windows(hf_config: Any) -> list[int | None]:
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


def hf_kv_sliding_window(hf_config: Any) -> int | None:
    """The largest window when every layer is windowed (KV behind it is dead for all layers), else None."""
    windows = hf_layer_sliding_windows(hf_config)
    if not windows or any(w is None for w in windows):
        return None
    return max(windows)


def read_checkpoint(model: str | None, load_format: str) -> tuple[str, Any, bool]:
    """(resolved path, HF config, is_gguf) of ``model``; None means the embedded default model."""
    if model is None:
        from sluice.models.default_model import default_model_path
        model = default_model_path()
    if not os.path.exists(model):
        raise FileNotFoundError(
            f"model path {model!r} does not exist (sluice loads local HF folders and .gguf files; "
            "nothing is downloaded)")
    is_gguf = model.endswith(".gguf") or load_format == "gguf"
    if is_gguf:
        from sluice.models.gguf_loader import open_gguf
        return model, copy.deepcopy(open_gguf(model).hf_config), True  # the engine's own, as from a folder
    from sluice.models.loader import load_hf_config
    return model, load_hf_config(model), False


def default_served_name(given: str | None) -> str:
    """The name the API reports when --served-model-name is not given: the model path, or the default's name."""
    if given is None:
        from sluice.models.default_model import DEFAULT_MODEL_NAME
        return DEFAULT_MODEL_NAME
    return given
