"""Rotary position embedding, neox style (HF Llama / Qwen): rotate the two halves of each head.

The rope settings and frequency math of each rope type live in rope_scaling.py. cos/sin are
computed from the positions each step (a [T, rotary_dim / 2] product, negligible next to the
projections) rather than cached up to max_position_embeddings, which keeps memory flat and has
no length limit.

On CUDA one Triton kernel (``fused_kernels.apply_rotary_``) rotates q and k in place, computing
cos/sin from the positions itself, for rope types with static frequencies and no attention factor; on the CPU in
bfloat16 one C call (``cpu_fused.apply_rotary_``) does the same; elsewhere ``forward_torch`` runs: the reference
they follow.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sluice.layers.rope_scaling import (
    SUPPORTED_ROPE_TYPES, RopeSettings, compute_inv_freq, dynamic_inv_freq, rotary_exponents,
)

from sluice.layers import cpu_fused

try:  # CPU-only installs have no triton
    from sluice.layers import fused_kernels
except ImportError:
    fused_kernels = None

__all__ = ["SUPPORTED_ROPE_TYPES", "RopeSettings", "RotaryEmbedding", "compute_inv_freq", "get_rope"]


class RotaryEmbedding(nn.Module):
    """Applies rope to packed q [T, H * D] and k [T, Hkv * D] at their absolute positions [T].

    Returns the rotated (q, k). Where a fused kernel runs (CUDA; CPU bfloat16) these are the inputs themselves,
    rotated in place (q and k may be strided column slices of the qkv projection); otherwise new tensors.
    """

    # (positions, its version, dtype, rope, rotary_dim, cos, sin) of the last CPU forward_torch, which the other
    # layers of the step reuse
    _step_cos_sin: tuple | None = None

    def __init__(self, head_dim: int, rope: RopeSettings) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rope = rope
        self.rotary_dim = int(head_dim * rope.partial_rotary_factor)
        self.attention_scaling = rope.attention_scaling()
        # float32 whatever the model dtype, on the device of construction; not part of checkpoints.
        device = torch.get_default_device()
        self.register_buffer("inv_freq", compute_inv_freq(self.rotary_dim, rope).to(device), persistent=False)
        if rope.is_dynamic:  # per-token frequencies are computed on the device from these
            self.register_buffer("exponents", rotary_exponents(self.rotary_dim).to(device), persistent=False)
        # The fused kernel takes one frequency vector and no cos/sin scale.
        self.fusable = not rope.is_dynamic and self.attention_scaling == 1.0

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fusable:
            if fused_kernels is not None and fused_kernels.can_apply_rotary(positions, query, key, self.inv_freq,
                                                                            self.head_dim, self.rotary_dim):
                fused_kernels.apply_rotary_(positions, query, key, self.inv_freq, self.head_dim, self.rotary_dim)
                return query, key
            if cpu_fused.can_apply_rotary(positions, query, key, self.inv_freq, self.head_dim, self.rotary_dim):
                cpu_fused.apply_rotary_(positions, query, key, self.inv_freq, self.head_dim, self.rotary_dim)
                return query, key
        return self.forward_torch(positions, query, key)

    def forward_torch(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        if self.rope.is_dynamic:
            inv_freq = dynamic_inv_freq(positions, self.exponents, self.rope)
        else:  # every layer of a step rotates the same positions with the same frequencies: once per step
            cached = RotaryEmbedding._step_cos_sin
            if cached is not None and cached[0] is positions and cached[1] == positions._version \
                    and cached[2] is query.dtype and cached[3] == self.rope and cached[4] == self.rotary_dim:
                return self._rotate(query, cached[5], cached[6]), self._rotate(key, cached[5], cached[6])
        freqs = positions.float().unsqueeze(-1) * inv_freq  # [T, rotary_dim / 2]
        cos, sin = freqs.cos(), freqs.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        cos = cos.to(query.dtype).unsqueeze(1)  # [T, 1, rotary_dim / 2]: broadcast over heads
        sin = sin.to(query.dtype).unsqueeze(1)
        if not self.rope.is_dynamic and positions.device.type == "cpu" and not positions.is_inference():
            # Keyed by the positions tensor itself (each step hands the layers a new one, the reference held
            # here keeps its id from being reused, and its version counter catches in-place updates), the
            # settings (which fix inv_freq) and the dtype. CPU only: on CUDA this path serves the ropes the fused
            # kernel does not take, and a graph capture must record its own cos/sin, not reuse its warm-up's.
            # Tensors made under inference_mode keep no version counter (a draft proposer advances its
            # positions in place), so they are never cached.
            RotaryEmbedding._step_cos_sin = (positions, positions._version, query.dtype, self.rope,
                                             self.rotary_dim, cos, sin)
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


def get_rope(head_dim: int, hf_config: Any, layer_type: str | None = None) -> RotaryEmbedding:
    """The rope of ``hf_config``; ``layer_type`` picks a per-layer-type entry of rope_parameters (Gemma 3)."""
    return RotaryEmbedding(head_dim, RopeSettings.from_hf_config(hf_config, layer_type))
