"""Rotary position embedding, neox style (HF Llama / Qwen): rotate the two halves of each head.

Rope settings come from either transformers layout:

    transformers 4:  config.rope_theta = 5e5, config.rope_scaling = {"rope_type": "llama3", "factor": 8, ...}
    transformers 5:  config.rope_parameters = {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8, ...}

``RopeSettings.from_hf_config`` folds both into one dataclass. Supported scalings: none
("default"), "linear" and "llama3". cos/sin are computed from the positions each step
(a [T, rotary_dim / 2] product, negligible next to the projections) rather than cached up to
max_position_embeddings, which keeps memory flat and has no length limit.

On CUDA one Triton kernel (``fused_kernels.apply_rotary_``) rotates q and k in place, computing
cos/sin from the positions itself; elsewhere ``forward_torch`` runs: the reference it follows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

try:  # CPU-only installs have no triton; they run forward_torch
    from sluice.layers import fused_kernels
except ImportError:
    fused_kernels = None

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeSettings:
    rope_theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    partial_rotary_factor: float = 1.0

    @classmethod
    def from_hf_config(cls, config: Any) -> "RopeSettings":
        params: dict[str, Any] = {}
        # transformers 4 style first, so that transformers 5's merged dict wins where both exist.
        if getattr(config, "rope_theta", None) is not None:
            params["rope_theta"] = config.rope_theta
        params.update(getattr(config, "rope_scaling", None) or {})
        rope_parameters = getattr(config, "rope_parameters", None) or {}
        if "rope_type" in rope_parameters or "rope_theta" in rope_parameters:
            params.update(rope_parameters)
        rope_type = params.get("rope_type") or params.get("type") or "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope_type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
        original_max = params.get("original_max_position_embeddings")
        if rope_type == "llama3" and original_max is None:
            original_max = getattr(config, "max_position_embeddings", None)
        return cls(
            rope_theta=float(params.get("rope_theta", 10000.0)),
            rope_type=rope_type,
            factor=float(params.get("factor", 1.0)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=original_max,
            partial_rotary_factor=float(partial or 1.0),
        )


def compute_inv_freq(rotary_dim: int, rope: RopeSettings) -> torch.Tensor:
    """float32 [rotary_dim / 2] inverse frequencies, scaled as the rope_type says (same math as HF)."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    inv_freq = 1.0 / (rope.rope_theta ** exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        return _llama3_scale(inv_freq, rope)
    return inv_freq


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


class RotaryEmbedding(nn.Module):
    """Applies rope to packed q [T, H * D] and k [T, Hkv * D] at their absolute positions [T].

    Returns the rotated (q, k). On CUDA these are the inputs themselves, rotated in place (q and k
    may be strided column slices of the qkv projection); on CPU they are new tensors.
    """

    def __init__(self, head_dim: int, rope: RopeSettings) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = int(head_dim * rope.partial_rotary_factor)
        # float32 whatever the model dtype, on the device of construction; not part of checkpoints.
        self.register_buffer("inv_freq", compute_inv_freq(self.rotary_dim, rope).to(torch.get_default_device()),
                             persistent=False)

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if fused_kernels is not None and fused_kernels.can_apply_rotary(positions, query, key, self.inv_freq,
                                                                        self.head_dim, self.rotary_dim):
            fused_kernels.apply_rotary_(positions, query, key, self.inv_freq, self.head_dim, self.rotary_dim)
            return query, key
        return self.forward_torch(positions, query, key)

    def forward_torch(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float().unsqueeze(-1) * self.inv_freq  # [T, rotary_dim / 2]
        cos = freqs.cos().to(query.dtype).unsqueeze(1)  # [T, 1, rotary_dim / 2]: broadcast over heads
        sin = freqs.sin().to(query.dtype).unsqueeze(1)
        return self._rotate(query, cos, sin), self._rotate(key, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.view(shape[0], -1, self.head_dim)
        rot, passthrough = x[..., :self.rotary_dim], x[..., self.rotary_dim:]
        x1, x2 = rot.chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        if passthrough.shape[-1]:
            rotated = torch.cat((rotated, passthrough), dim=-1)
        return rotated.reshape(shape)


def get_rope(head_dim: int, hf_config: Any) -> RotaryEmbedding:
    return RotaryEmbedding(head_dim, RopeSettings.from_hf_config(hf_config))
