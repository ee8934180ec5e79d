"""Turns a local HF folder (or nothing, with dummy weights) into a ready model.

    load_hf_config(folder)          config.json -> transformers.PretrainedConfig (never the hub)
    iterate_safetensors(folder)     (name, tensor) over every *.safetensors shard, one at a time
    resolve_dtype(config, "auto")   the checkpoint's dtype; on CPU, 16-bit checkpoints run in bfloat16 where the
                                    CPU has native bf16 (AMX / AVX512-BF16), float32 elsewhere
    build_model(...)                instantiate on the target device (quantized linear layers if the
                                    checkpoint or ``quantization`` says so), then load or fill dummy weights;
                                    KV cache scales go to the attention layers (kv_scales.py)

The model is constructed directly on the target device in the target dtype (parameters are
``torch.empty``), so weights stream from the mmapped safetensors into their final place with no
intermediate full copy.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from safetensors import safe_open
from tqdm import tqdm

from sluice.attention.backend import AttentionBackend
from sluice.models.kv_scales import KVScaleCollector
from sluice.models.registry import get_model_class

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SAFETENSORS_INDEX = "model.safetensors.index.json"


def load_hf_config(model_path: str | os.PathLike) -> Any:
    """The transformers config of a local model folder; nothing is downloaded."""
    from transformers import AutoConfig

    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model path {str(path)!r} has no config.json (sluice loads local HF folders only)")
    return AutoConfig.from_pretrained(str(path), local_files_only=True)


def safetensors_files(folder: str | os.PathLike) -> list[Path]:
    """The checkpoint's shards: those the index names if there is one, else every *.safetensors."""
    folder = Path(folder)
    index = folder / _SAFETENSORS_INDEX
    if index.is_file():
        # The index rules out stray files sometimes shipped alongside (e.g. consolidated.safetensors).
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {str(folder)!r}")
    return files


def iterate_safetensors(folder: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (HF tensor name, CPU tensor) shard by shard, so only one tensor is materialized at a time."""
    for file in safetensors_files(folder):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def resolve_dtype(hf_config: Any, dtype_str: str, device_type: str) -> torch.dtype:
    """dtype flag -> torch dtype. "auto": the checkpoint's dtype; on CPU a 16-bit checkpoint runs in bfloat16
    where the CPU computes bf16 natively (``cpu_has_native_bf16``) and in float32 elsewhere. Results that must
    match transformers exactly ask for float32 explicitly."""
    if dtype_str != "auto":
        if dtype_str not in _DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}, got {dtype_str!r}")
        return _DTYPES[dtype_str]
    # vars(): transformers 5 warns on every read of the deprecated torch_dtype attribute, so read the stored one
    checkpoint_dtype = getattr(hf_config, "dtype", None) or vars(hf_config).get("torch_dtype")
    if isinstance(checkpoint_dtype, str):
        checkpoint_dtype = _DTYPES.get(checkpoint_dtype.removeprefix("torch."))
    if checkpoint_dtype not in _DTYPES.values():
        return torch.float32
    if device_type == "cpu" and checkpoint_dtype in (torch.float16, torch.bfloat16):
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32  # emulated bf16 is slower than float32
    return checkpoint_dtype


_NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has bf16 matmul instructions (AMX-BF16 or AVX512-BF16), from its cpuinfo flags."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return any(flag in line.split() for flag in _NATIVE_BF16_FLAGS)
    except OSError:
        pass
    return False


@torch.no_grad()
def initialize_dummy_weights(model: torch.nn.Module, seed: int, low: float = -1e-3, high: float = 1e-3) -> None:
    """Fills every parameter with uniform(low, high) noise, reproducibly for a seed (as vLLM's dummy format)."""
    generator: torch.Generator | None = None
    for param in model.parameters():
        if not param.is_floating_point() or param.numel() == 0:
            continue  # placeholders of pre-quantized formats: nothing to fill
        if generator is None or generator.device != param.device:
            generator = torch.Generator(device=param.device).manual_seed(seed)
        param.uniform_(low, high, generator=generator)


def build_model(hf_config: Any, dtype: torch.dtype, device: torch.device | str, attn_backend: AttentionBackend,
                weights: Iterable[tuple[str, torch.Tensor]] | None = None, load_format: str = "auto",
                seed: int = 0, quantization: str | None = None,
                q4_blocks: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """A model on ``device`` in ``dtype`` with its weights loaded (or dummy ones), in eval mode.

    ``quantization``: the --quantization flag; the checkpoint's own ``quantization_config`` applies either way.
    ``q4_blocks``: a GGUF's raw Q4_0 / Q4_1 blocks per HF module name (``GGUFCheckpoint.q4_blocks``); on the CPU
    in bf16 the layers they fill also keep them for small-batch products (layers/quantization/cpu_int4.py)."""
    from sluice.layers.quantization import (process_quantized_weights, quantization_context,
                                            resolve_quant_config, unquantize_ignored_layers)

    model_class = get_model_class(hf_config)
    quant_config = resolve_quant_config(hf_config, quantization)
    with quantization_context(quant_config):
        model = model_class(hf_config, dtype, torch.device(device), attn_backend)
    unquantize_ignored_layers(model, quant_config)
    kv_scales = KVScaleCollector()  # KV cache scales are no parameters: each layer's Attention takes them
    _load_or_fill(model, kv_scales.filter(weights) if weights is not None else None, load_format, seed)
    model.checkpoint_kv_scales = kv_scales.apply(model)  # layer index -> (k_scale, v_scale) the checkpoint had
    process_quantized_weights(model)
    if torch.device(device).type == "cpu":
        from sluice.layers.cpu_linear import pack_cpu_weights
        pack_cpu_weights(model)
        from sluice.layers.quantization.cpu_int4 import attach_cpu_int4_decode, cpu_int4_decode_enabled
        if q4_blocks and cpu_int4_decode_enabled(device, dtype):
            attach_cpu_int4_decode(model, q4_blocks)
    return model.eval()


def _load_or_fill(model: torch.nn.Module, weights: Iterable[tuple[str, torch.Tensor]] | None, load_format: str,
                  seed: int) -> None:
    if load_format == "dummy":
        initialize_dummy_weights(model, seed)
    elif weights is None:
        raise ValueError(f"load_format {load_format!r} needs a weights iterator (only 'dummy' loads without one)")
    else:
        progress = tqdm(weights, desc="Loading weights", unit=" tensors", disable=not sys.stderr.isatty())
        model.load_weights(progress)
