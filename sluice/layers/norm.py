"""RMSNorm, with the fused residual-add variant every decoder layer uses.

``norm(x)`` returns the normalized ``x``; ``norm(x, residual)`` first adds the residual
stream (``x + residual`` becomes the new residual) and returns ``(normed, new_residual)``,
so decoder layers never materialize the add separately.

On CUDA both forms run as one Triton kernel (``fused_kernels.rms_norm``), on the CPU in bfloat16 as one C call
(``cpu_fused.rms_norm``); elsewhere, and for shapes the kernels do not take, ``forward_torch`` runs: the
reference the kernels follow.

``GemmaRMSNorm`` (Gemma 2/3) scales by ``1 + weight`` and multiplies before the cast back to the
input dtype, as transformers' Gemma norms do; on CUDA it runs the same kernel with ``1 + weight``
(which casts before the multiply: the same result in float32, within rounding in bf16).
"""
from __future__ import annotations

import torch
from torch import nn

from sluice.layers import cpu_fused

try:  # CPU-only installs have no triton
    from sluice.layers import fused_kernels
except ImportError:
    fused_kernels = None


class RMSNorm(nn.Module):
    gemma = False  # the CPU kernel's variant: weight * bf16(normed), or (GemmaRMSNorm) normed * (1 + weight)

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # Variance in float32 and the cast back before the weight multiply, as HF does,
        # so that half-precision outputs match the reference bit for bit where possible.
        input_dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(input_dtype)

    def kernel_weight(self) -> torch.Tensor:
        """The per-channel scale the fused kernel multiplies by."""
        return self.weight

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if fused_kernels is not None and fused_kernels.can_rms_norm(x, self.weight, residual):
            return fused_kernels.rms_norm(x, self.kernel_weight(), self.eps, residual)
        if cpu_fused.can_rms_norm(x, self.weight, residual):
            return cpu_fused.rms_norm(x, self.weight, self.eps, residual, self.gemma)
        return self.forward_torch(x, residual)

    def forward_torch(self, x: torch.Tensor, residual: torch.Tensor | None = None
                      ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self._norm(x)
        residual = x + residual
        return self._norm(residual), residual


class GemmaRMSNorm(RMSNorm):
    """x / rms(x) * (1 + weight), in float32 before the cast back (checkpoints store weight - 1)."""

    gemma = True

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__(hidden_size, eps)
        with torch.no_grad():
            self.weight.zero_()

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).to(x.dtype)

    def kernel_weight(self) -> torch.Tensor:
        return self.weight + 1.0
