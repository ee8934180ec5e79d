"""Activations of gated MLPs: ``SiluAndMul`` splits a merged gate_up projection in half.

On CUDA it runs as one Triton kernel (``fused_kernels.silu_and_mul``); elsewhere ``forward_torch``
runs: the reference the kernel follows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:  # CPU-only installs have no triton; they run forward_torch
    from sluice.layers import fused_kernels
except ImportError:
    fused_kernels = None


class SiluAndMul(nn.Module):
    """x: [..., 2 * d] laid out as [gate | up] -> silu(gate) * up: [..., d]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_kernels is not None and fused_kernels.can_silu_and_mul(x):
            return fused_kernels.silu_and_mul(x)
        return self.forward_torch(x)

    def forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
