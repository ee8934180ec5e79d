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

**float32 products for many rows.** On CPUs whose bf16 matmul is slower than float32's (AVX512-BF16 without
AMX: oneDNN's bf16 brgemm ran 1.3-1.6x slower than float32 from 16 rows up, e.g. a 256 x 576 x 49,152 LM head
97 ms vs 70 ms), a bf16/fp16 weight also keeps a packed float32 copy, and products of at least
``SLUICE_CPU_F32_MIN_ROWS`` (16) rows run on it: the activations widen to float32 (exact), the product
accumulates in float32 as oneDNN's bf16 kernel does, and the output rounds back to the model dtype once, so
results differ from the bf16 product only in summation order. Fewer rows stay on the bf16 copy, where reading
half the bytes wins. ``SLUICE_CPU_F32_PRODUCTS=auto`` (the default) times both on one product at start-up and
keeps the copies only when float32 is at least 1.2x faster and the copies add at most 4 GiB (1 forces them,
0 turns them off); with AMX, bf16 wins and nothing changes.
"""
from __future__ import annotations

import functools
import logging
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from sluice.layers.quantization.base import UnquantizedLinearMethod

logger = logging.getLogger(__name__)

ENV_PACKED_LINEAR = "SLUICE_CPU_PACKED_LINEAR"
ENV_F32_PRODUCTS = "SLUICE_CPU_F32_PRODUCTS"  # auto | 1 | 0
ENV_F32_MIN_ROWS = "SLUICE_CPU_F32_MIN_ROWS"
DEFAULT_F32_MIN_ROWS = 16
F32_MIN_SPEEDUP = 1.2
F32_MAX_EXTRA_BYTES = 4 << 30
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
    """One weight in oneDNN's blocked layout; ``linear(x, bias)`` == ``F.linear(x, weight, bias)`` (bit for bit,
    or, with a float32 copy and at least ``f32_min_rows`` rows, up to summation order)."""

    __slots__ = ("weight", "packed", "version", "packed_f32", "f32_min_rows")

    def __init__(self, weight: torch.Tensor, f32_min_rows: int | None = None) -> None:
        self.weight = weight
        self.packed, self.version, self.packed_f32 = None, -1, None
        self.f32_min_rows = f32_min_rows  # None: no float32 copy
        self.repack()

    def repack(self) -> None:
        weight = self.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 256)
        if self.f32_min_rows is not None:
            self.packed_f32 = torch.ops.mkldnn._reorder_linear_weight(weight.float(), 256)
        self.version = self.weight._version

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.dtype != self.weight.dtype or x.numel() == 0:
            return F.linear(x, self.weight, bias)
        if self.weight._version != self.version:
            self.repack()
        if self.packed_f32 is not None and x.numel() >= self.f32_min_rows * x.shape[-1]:
            out = torch.ops.mkldnn._linear_pointwise(x.float(), self.packed_f32, None if bias is None else bias.float(),
                                                     "none", [], "")
            return out.to(x.dtype)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")


class CpuPackedLinearMethod(UnquantizedLinearMethod):
    """The dense method with its product on a packed copy of the weight (made after loading)."""

    def __init__(self, f32_min_rows: int | None = None) -> None:
        self.f32_min_rows = f32_min_rows

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        layer.packed_weight = PackedWeight(layer.weight, self.f32_min_rows)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return layer.packed_weight.linear(x, layer.bias)


@functools.lru_cache(maxsize=None)
def float32_products_speedup(dtype: torch.dtype, rows: int = 256) -> float:
    """How much faster a packed float32 product (with its casts) is than the packed ``dtype`` one, timed on a
    [rows, 1024] x [1024, 2048] product (best of three rounds, ~0.1 s on two cores)."""
    weight = torch.randn(2048, 1024).to(dtype)
    x = torch.randn(rows, 1024).to(dtype)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, 256)
    packed_f32 = torch.ops.mkldnn._reorder_linear_weight(weight.float(), 256)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(3):
                fn()
            times.append(time.perf_counter() - start)
        return min(times)

    with torch.inference_mode():
        native = best(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""))
        widened = best(lambda: torch.ops.mkldnn._linear_pointwise(x.float(), packed_f32, None, "none", [],
                                                                  "").to(dtype))
    return native / widened


def float32_copy_rows(dtype: torch.dtype, extra_bytes: int) -> int | None:
    """The row count from which products run on float32 copies (``SLUICE_CPU_F32_PRODUCTS``), or None."""
    mode = os.environ.get(ENV_F32_PRODUCTS, "auto")
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"{ENV_F32_PRODUCTS} must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return None
    min_rows = int(os.environ.get(ENV_F32_MIN_ROWS, DEFAULT_F32_MIN_ROWS))
    if mode == "auto":
        if extra_bytes > F32_MAX_EXTRA_BYTES:
            return None
        speedup = float32_products_speedup(dtype)
        if speedup < F32_MIN_SPEEDUP:
            return None
        logger.info("CPU: %s products of >= %d rows run on float32 copies of the weights (%.1fx faster here; "
                    "%.0f MiB more memory; %s=0 turns this off)", str(dtype).removeprefix("torch."), min_rows,
                    speedup, extra_bytes / 2**20, ENV_F32_PRODUCTS)
    return min_rows


def pack_cpu_weights(model: nn.Module) -> int:
    """Moves the dense linear layers and the LM head of a CPU model in bf16/fp16 to packed weights (with float32
    copies where ``float32_copy_rows`` says so); returns how many were packed (0 where packing does not apply)."""
    from sluice.layers.vocab import LMHead

    targets = []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.device.type != "cpu" or weight.dim() != 2:
            continue
        if not packed_linear_supported(weight.dtype):
            return 0
        if type(getattr(module, "linear_method", None)) is UnquantizedLinearMethod:
            targets.append(module)
        elif isinstance(module, LMHead) and module.tp_size == 1:
            targets.append(module)
    if not targets:
        return 0
    f32_min_rows = float32_copy_rows(targets[0].weight.dtype, sum(4 * m.weight.numel() for m in targets))
    for module in targets:
        if isinstance(module, LMHead):
            module.packed = PackedWeight(module.weight, f32_min_rows)
        else:
            module.linear_method = CpuPackedLinearMethod(f32_min_rows)
            module.linear_method.process_weights_after_loading(module)
    return len(targets)
