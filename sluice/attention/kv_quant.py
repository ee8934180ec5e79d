"""FP8 KV cache (``--kv-cache-dtype fp8``): how a cache element maps back to the model's K and V.

Each attention layer has one scale for its keys and one for its values (per tensor, as vLLM's):

    write:  stored = float8_e4m3fn(clamp(x / scale, -448, 448))      round to nearest even
    read:   x ~= float(stored) * scale

``kv_scales`` is that layer's float32 tensor ``[k_scale, v_scale]`` on the cache's device (a tensor, not a
Python float: the Triton kernels read it, so CUDA graphs captured before ``--calculate-kv-scales`` fills it
see the new values). The cache's dtype is the switch: every backend quantizes and dequantizes exactly
when ``kv_cache.dtype`` is ``FP8_KV_DTYPE``, and a model-dtype cache runs as it always did.

The reference (torch_ref) dequantizes K and V in float32; the fast paths fold the scales into the math
instead (k_scale into the softmax scale, v_scale into the output), which is the same product.
"""
from __future__ import annotations

import torch

FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def resolve_kv_cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV cache's torch dtype for the ``--kv-cache-dtype`` flag: auto is the model's dtype."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype in ("fp8", "fp8_e4m3"):
        return FP8_KV_DTYPE
    raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r} is not supported: use auto, fp8 or fp8_e4m3")


def check_fp8_kv_device(device: torch.device) -> None:
    """Refuses a GPU without float8 conversions (Triton's float8_e4m3fn needs compute capability 8.9+)."""
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise ValueError(f"--kv-cache-dtype fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper); "
                         f"{name} has {capability[0]}.{capability[1]}: use --kv-cache-dtype auto")


def is_fp8_kv_cache(kv_cache: torch.Tensor) -> bool:
    return kv_cache.dtype == FP8_KV_DTYPE


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale, saturated to the float8 range and rounded to the nearest float8_e4m3fn."""
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_KV_DTYPE)


def kv_scales_of(kv_cache: torch.Tensor, kv_scales: torch.Tensor | None) -> torch.Tensor | None:
    """The layer's scales when its cache is fp8 (which then needs them), else None."""
    if not is_fp8_kv_cache(kv_cache):
        return None
    if kv_scales is None:
        raise ValueError("an fp8 KV cache needs the layer's kv_scales ([k_scale, v_scale])")
    return kv_scales


def calculated_kv_scales(key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``--calculate-kv-scales``: [amax(|K|), amax(|V|)] / 448 over a batch, so it fills the float8 range
    exactly (a zero tensor keeps a tiny positive scale rather than dividing by zero)."""
    amax = torch.stack([key.detach().abs().amax(), value.detach().abs().amax()]).float()
    return (amax / torch.full_like(amax, FP8_MAX)).clamp_min_(torch.finfo(torch.float32).tiny)  # a true quotient
