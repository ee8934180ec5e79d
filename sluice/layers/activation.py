"""Activations of gated MLPs: each splits a merged gate_up projection in half.

``SiluAndMul`` (Llama, Qwen, Phi-3) runs on CUDA as one Triton kernel (``fused_kernels.silu_and_mul``) and on
the CPU in bfloat16 as one C call (``cpu_fused.silu_and_mul``); elsewhere ``forward_torch`` runs: the reference
the kernels follow. ``GeluTanhAndMul`` (GeGLU with
the tanh approximation, Gemma's ``gelu_pytorch_tanh``) is plain torch everywhere.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sluice.layers import cpu_fused

try:  # CPU-only installs have no triton
    from sluice.layers import fused_kernels
except ImportError:
    fused_kernels = None


class SiluAndMul(nn.Module):
    """x: [..., 2 * d] laid out as [gate | up] -> silu(gate) * up: [..., d]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_kernels is not None and fused_kernels.can_silu_and_mul(x):
            return fused_kernels.silu_and_mul(x)
        if cpu_fused.can_silu_and_mul(x):
            return cpu_fused.silu_and_mul(x)
        return self.forward_torch(x)

    def forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class GeluTanhAndMul(nn.Module):
    """x: [..., 2 * d] laid out as [gate | up] -> gelu_tanh(gate) * up: [..., d]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up


_GATED_ACTIVATIONS = {"silu": SiluAndMul, "swish": SiluAndMul, "gelu_pytorch_tanh": GeluTanhAndMul,
                      "gelu_tanh": GeluTanhAndMul}


def get_gated_activation(name: str) -> nn.Module:
    """The gated activation for an HF ``hidden_act`` / ``hidden_activation`` name."""
    if name not in _GATED_ACTIVATIONS:
        raise ValueError(f"hidden activation {name!r} is not supported; supported: {', '.join(_GATED_ACTIVATIONS)}")
    return _GATED_ACTIVATIONS[name]()
