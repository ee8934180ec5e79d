"""Rope settings and inverse frequencies, as transformers' rope initialization functions define them.

Rope settings come from either transformers layout:

    transformers 4:  config.rope_theta = 5e5, config.rope_scaling = {"rope_type": "llama3", "factor": 8, ...}
    transformers 5:  config.rope_parameters = {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8, ...}
    per layer type:  config.rope_parameters = {"sliding_attention": {...}, "full_attention": {...}}  (Gemma 3)

``RopeSettings.from_hf_config`` folds them into one dataclass. Rope types:

    default, linear, llama3, yarn   static frequencies (yarn also scales cos/sin by an attention factor)
    dynamic                         NTK base grown with the sequence length past max_position_embeddings
    longrope (su)                   per-dimension factors (short or long) and an attention factor

transformers picks dynamic frequencies once per forward call, from the largest position in it.
Here each token rotates with the frequencies of a sequence that ends at it (``seq_len = position
+ 1``): for generation (one new token per call) that is exactly what transformers does, and unlike
a per-call choice it does not depend on how prompts are chunked (KV stays a function of the
prefix, which prefix caching needs).

longrope: transformers switches to the long factors once a sequence passes
original_max_position_embeddings and recomputes the whole cache. As vLLM, sluice picks one set for
the engine instead: the long factors iff max_model_len exceeds the original length (the engine
passes max_model_len as ``config.sluice_max_model_len``; without it, max_position_embeddings). So
KV never has to be recomputed, and sluice equals transformers for any sequence that stays in its regime.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "longrope")
# Position-dependent types: their frequencies depend on each token's position (see the module docstring).
DYNAMIC_ROPE_TYPES = ("dynamic",)


@dataclass(frozen=True)
class RopeSettings:
    rope_theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    partial_rotary_factor: float = 1.0
    max_position_embeddings: int = 2048
    # yarn
    attention_factor: float | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    # longrope
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    use_long_factors: bool = False

    @classmethod
    def from_hf_config(cls, config: Any, layer_type: str | None = None) -> "RopeSettings":
        params = _rope_params(config, layer_type)
        rope_type = params.get("rope_type") or params.get("type") or "default"
        rope_type = "longrope" if rope_type == "su" else rope_type  # Phi-3's older name
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope_type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
        max_positions = int(getattr(config, "max_position_embeddings", 0) or 2048)
        original_max = (params.get("original_max_position_embeddings")
                        or getattr(config, "original_max_position_embeddings", None))
        if rope_type in ("llama3", "longrope") and original_max is None:
            original_max = max_positions
        if rope_type == "yarn" and original_max is None:
            raise ValueError("rope_type 'yarn' needs original_max_position_embeddings in rope_parameters")
        factor = params.get("factor")
        if factor is None and rope_type in ("yarn", "longrope"):
            factor = max_positions / original_max  # transformers' default for both
        return cls(
            rope_theta=float(params.get("rope_theta", 10000.0)),
            rope_type=rope_type,
            factor=float(factor if factor is not None else 1.0),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=original_max,
            partial_rotary_factor=float(partial or 1.0),
            max_position_embeddings=max_positions,
            attention_factor=params.get("attention_factor"),
            beta_fast=float(params.get("beta_fast") or 32.0),
            beta_slow=float(params.get("beta_slow") or 1.0),
            mscale=params.get("mscale"),
            mscale_all_dim=params.get("mscale_all_dim"),
            truncate=bool(params.get("truncate", True)),
            short_factor=tuple(params.get("short_factor") or ()),
            long_factor=tuple(params.get("long_factor") or ()),
            use_long_factors=(rope_type == "longrope" and
                              (getattr(config, "sluice_max_model_len", None) or max_positions) > original_max),
        )

    @property
    def is_dynamic(self) -> bool:
        return self.rope_type in DYNAMIC_ROPE_TYPES

    def attention_scaling(self) -> float:
        """The factor cos and sin are multiplied by (1 except for yarn and longrope)."""
        if self.rope_type == "yarn":
            if self.attention_factor is not None:
                return float(self.attention_factor)
            if self.mscale and self.mscale_all_dim:
                return float(_yarn_mscale(self.factor, self.mscale) / _yarn_mscale(self.factor, self.mscale_all_dim))
            return _yarn_mscale(self.factor)
        if self.rope_type == "longrope":
            if self.attention_factor is not None:
                return float(self.attention_factor)
            if self.factor <= 1.0:
                return 1.0
            return math.sqrt(1 + math.log(self.factor) / math.log(self.original_max_position_embeddings))
        return 1.0

    def context_length(self) -> int:
        """The longest sequence the scaled rope serves, as vLLM derives it (max_model_len's upper bound)."""
        if self.rope_type in ("default", "llama3", "longrope") or self.factor <= 1.0:
            return self.max_position_embeddings
        if self.rope_type == "yarn":
            return int(self.original_max_position_embeddings * self.factor)
        return int(self.max_position_embeddings * self.factor)


def _rope_params(config: Any, layer_type: str | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    # transformers 4 style first, so that transformers 5's merged dict wins where both exist.
    if getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    params.update(getattr(config, "rope_scaling", None) or {})
    rope_parameters = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None and isinstance(rope_parameters.get(layer_type), dict):
        return {**params, **rope_parameters[layer_type]}
    if layer_type == "sliding_attention" and getattr(config, "rope_local_base_freq", None) is not None:
        return {"rope_theta": config.rope_local_base_freq}  # Gemma 3's local layers: plain rope, own base
    if "rope_type" in rope_parameters or "rope_theta" in rope_parameters:
        params.update(rope_parameters)
    return params


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rotary_exponents(rotary_dim: int) -> torch.Tensor:
    """float32 [rotary_dim / 2]: 2i / rotary_dim, the exponent of the base for each frequency."""
    return torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim


def compute_inv_freq(rotary_dim: int, rope: RopeSettings) -> torch.Tensor:
    """float32 [rotary_dim / 2] inverse frequencies, scaled as the rope_type says (same math as HF).

    For dynamic rope these are the unscaled ones; ``dynamic_inv_freq`` gives the per-token ones.
    """
    inv_freq = 1.0 / (rope.rope_theta ** rotary_exponents(rotary_dim))
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        return _llama3_scale(inv_freq, rope)
    if rope.rope_type == "yarn":
        return _yarn_inv_freq(rotary_dim, rope)
    if rope.rope_type == "longrope":
        return _longrope_inv_freq(rotary_dim, rope, rope.long_factor if rope.use_long_factors else rope.short_factor)
    return inv_freq


def dynamic_inv_freq(positions: torch.Tensor, exponents: torch.Tensor, rope: RopeSettings) -> torch.Tensor:
    """float32 [T, rotary_dim / 2]: each token's dynamic-NTK frequencies for a sequence ending at it.

    ``exponents`` is ``rotary_exponents(rotary_dim)`` on the positions' device: no host tensor is made
    here, so the computation can be captured in a CUDA graph."""
    rotary_dim = 2 * exponents.shape[0]
    seq_len = positions.long() + 1
    # dynamic NTK: base * ((factor * L / max_pos) - (factor - 1)) ** (dim / (dim - 2)), L >= max_pos
    max_pos = rope.max_position_embeddings
    seq_len = torch.clamp(seq_len, min=max_pos)
    base = rope.rope_theta * ((rope.factor * seq_len / max_pos) - (rope.factor - 1)) ** (rotary_dim / (rotary_dim - 2))
    return 1.0 / (base.unsqueeze(-1) ** exponents)


def _longrope_inv_freq(rotary_dim: int, rope: RopeSettings, ext_factors: tuple[float, ...]) -> torch.Tensor:
    if len(ext_factors) != rotary_dim // 2:
        raise ValueError(f"longrope short_factor and long_factor need {rotary_dim // 2} entries, "
                         f"got {len(ext_factors)}")
    return 1.0 / (torch.tensor(ext_factors, dtype=torch.float32) * rope.rope_theta ** rotary_exponents(rotary_dim))


def _yarn_inv_freq(rotary_dim: int, rope: RopeSettings) -> torch.Tensor:
    """Extrapolated high frequencies, interpolated (divided by factor) low ones, a linear ramp between."""
    base, original_max = rope.rope_theta, rope.original_max_position_embeddings

    def correction_dim(num_rotations: float) -> float:
        return (rotary_dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = torch.clamp((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (rope.factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    return interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor


def _llama3_scale(inv_freq: torch.Tensor, rope: RopeSettings) -> torch.Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by factor, blend smoothly in between."""
    old_context_len = rope.original_max_position_embeddings
    low_freq_wavelen = old_context_len / rope.low_freq_factor
    high_freq_wavelen = old_context_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_context_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)
