"""Pre-packed weights for bfloat16/float16 matmuls on the CPU.

``F.linear`` on the CPU hands a bf16 weight to oneDNN, which reorders it into its blocked (AMX / AVX-512)
layout on every call: at decode sizes the reorder costs as much as the product. Packing each weight once
after loading, as vLLM's CPU backend and inductor's freezing pass do, halves the time of the small-M
matmuls of a decode step (a 3072 x 576 projection at M = 1: 172 us -> 92 us on a 2-core AVX-512 BF16 CPU).
The packed product is the same oneDNN kernel on the same values: its results equal ``F.linear``'s bit for bit.

It attaches as the layers' linear method (``CpuPackedLinearMethod`` replaces ``UnquantizedLinearMethod`` on
CPU models in bf16/fp16) and as the LM head's ``packed`` hook; float32 models keep ``F.linear`` (MKL's sgemm,
the path the transformers equivalence tests compare against). ``SLUICE_CPU_PACKED_LINEAR=0`` turns it off.

The dense weight stays the layer's parameter (weight loading, LoRA and tied embeddings read it). A packed
copy remembers the parameter's version counter: a weight changed in place after packing is packed again
on its next use, never used stale.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from sluice.layers.quantization.base import UnquantizedLinearMethod

ENV_PACKED_LINEAR = "SLUICE_CPU_PACKED_LINEAR"
_PACKED_DTYPES = (torch.bfloat16, torch.float16)


def packed_linear_supported(dtype: torch.dtype) -> bool:
    """oneDNN weight packing helps (and is exact) for bf16/fp16 on CPUs that compute in them natively."""
    if os.environ.get(ENV_PACKED_LINEAR, "1") == "0" or dtype not in _PACKED_DTYPES:
        return False
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())


class PackedWeight:
    """One weight in oneDNN's blocked layout; ``linear(x, bias)`` == ``F.linear(x, weight, bias)``."""

    __slots__ = ("weight", "packed", "version")

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.packed, self.version = None, -1
        self.repack()

    def repack(self) -> None:
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 256)
        self.version = self.weight._version

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.dtype != self.weight.dtype or x.numel() == 0:
            return F.linear(x, self.weight, bias)
        if self.weight._version != self.version:
            self.repack()
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")


class CpuPackedLinearMethod(UnquantizedLinearMethod):
    """The dense method with its product on a packed copy of the weight (made after loading)."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        layer.packed_weight = PackedWeight(layer.weight)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return layer.packed_weight.linear(x, layer.bias)


def pack_cpu_weights(model: nn.Module) -> int:
    """Moves the dense linear layers and the LM head of a CPU model in bf16/fp16 to packed weights;
    returns how many were packed (0 where packing does not apply)."""
    from sluice.layers.vocab import LMHead

    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.device.type != "cpu" or weight.dim() != 2:
            continue
        if not packed_linear_supported(weight.dtype):
            return 0
        if type(getattr(module, "linear_method", None)) is UnquantizedLinearMethod:
            module.linear_method = CpuPackedLinearMethod()
            module.linear_method.process_weights_after_loading(module)
            count += 1
        elif isinstance(module, LMHead) and module.tp_size == 1:
            module.packed = PackedWeight(weight)
            count += 1
    return count
