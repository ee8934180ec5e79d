"""FP8 (float8_e4m3fn) linear methods.

    Fp8OnlineMethod       a 16/32-bit checkpoint quantized at load: one weight scale per output channel
    Fp8CheckpointMethod   pre-quantized weights with per-tensor or per-channel scales (HF "fp8",
                          compressed-tensors float8); per-shard scales of fused layers become per-channel
    Fp8BlockMethod        block-scaled weights (``weight_block_size`` [128, 128], ``weight_scale_inv``),
                          dequantized at load into the model dtype and applied as a dense weight

W8A8 matmuls (the first two) quantize activations per token (dynamic) or with the checkpoint's static
``input_scale`` (the largest of a fused layer's shards, as vLLM), then run ``torch._scaled_mm`` with
row-wise scales: scale_a [M, 1], scale_b [1, N]. On CUDA it needs compute capability 8.9+ (Ada, Hopper);
the activations are quantized by one Triton kernel (triton_fp8.py; the torch ops here are the CPU
reference and give the same float8 values), and ``SLUICE_FP8_GEMM=triton`` swaps ``_scaled_mm`` for a
split-K Triton GEMM at small M (decode); ``SLUICE_FP8_GEMM=tensorwise`` runs ``_scaled_mm`` with unit per-tensor
scales (cuBLASLt) and one Triton pass applying the row and column scales, up to ``SLUICE_FP8_TENSORWISE_MAX_M``
rows. Block-wise weights are dequantized rather than requantized
per channel because the latter would round them a second time: the dense weight equals the
checkpoint's dequantized weight exactly (in float32; rounded once to 16-bit dtypes).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from sluice.layers.quantization.base import (CheckpointShardsMethod, LinearMethod, UnquantizedLinearMethod,
                                             set_tensor)

try:  # CUDA kernels: activation quantization in one launch, a small-M GEMM
    from sluice.layers.quantization import triton_fp8
except ImportError:
    triton_fp8 = None

if TYPE_CHECKING:
    from sluice.layers.linear import LinearBase

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
FP8_GEMM = os.environ.get("SLUICE_FP8_GEMM", "scaled_mm")  # scaled_mm | triton | tensorwise (small M; fp8_linear)
FP8_QUANT = os.environ.get("SLUICE_FP8_QUANT", "triton")  # triton | torch: CUDA activation quantization
TRITON_GEMM_MAX_M = int(os.environ.get("SLUICE_FP8_TRITON_MAX_M", "64"))
TENSORWISE_MAX_M = int(os.environ.get("SLUICE_FP8_TENSORWISE_MAX_M", "128"))
if FP8_GEMM not in ("scaled_mm", "triton", "tensorwise") or FP8_QUANT not in ("triton", "torch"):
    raise ValueError(f"SLUICE_FP8_GEMM must be scaled_mm, triton or tensorwise (got {FP8_GEMM!r}), "
                     f"SLUICE_FP8_QUANT triton or torch (got {FP8_QUANT!r})")
_UNIT_SCALES: dict[torch.device, torch.Tensor] = {}  # the tensorwise GEMM's scale_a and scale_b, per device


def check_fp8_device(device: torch.device) -> None:
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"fp8 quantization needs a GPU of compute capability 8.9+ (Ada, Hopper); "
                         f"this one is {major}.{minor}")


def quantize_fp8_per_row(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, C] -> (float8 [R, C], float32 scales [R, 1]) with x ~= q * scale, each row's amax at FP8_MAX."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / torch.full_like(amax, FP8_MAX)  # a true quotient on every device (see quantize_rtn)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_fp8_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor | None,
               bias: torch.Tensor | None, gemm: str | None = None, quant: str | None = None) -> torch.Tensor:
    """x [..., K] (model dtype) times float8 weight [N, K] with per-channel ``weight_scale`` [N].

    On CUDA ``quant`` (default $SLUICE_FP8_QUANT, else triton) picks how activations are quantized and
    ``gemm`` (default $SLUICE_FP8_GEMM, else scaled_mm) the matmul: ``triton`` runs triton_fp8's split-K
    GEMM for up to TRITON_GEMM_MAX_M rows, ``tensorwise`` a per-tensor ``_scaled_mm`` and triton_fp8's scale
    epilogue for up to TENSORWISE_MAX_M rows, and ``_scaled_mm`` with row-wise scales above either."""
    shape, out_dtype = x.shape, x.dtype
    x2 = x.reshape(-1, shape[-1])
    if x2.shape[0] == 0:
        return x.new_empty(*shape[:-1], weight.shape[0])
    kernels = x.is_cuda and triton_fp8 is not None
    if kernels and (quant or FP8_QUANT) == "triton":
        x_fp8, scale_a = triton_fp8.quantize_activations(x2, input_scale)
    elif input_scale is None:
        x_fp8, scale_a = quantize_fp8_per_row(x2)
    else:
        x_fp8, scale_a = quantize_fp8_static(x2, input_scale), input_scale.float().reshape(1, 1).expand(x2.shape[0], 1)
    gemm = (gemm or FP8_GEMM) if kernels else None
    if gemm == "triton" and x2.shape[0] <= TRITON_GEMM_MAX_M:
        out = triton_fp8.fp8_gemm(x_fp8, scale_a, weight, weight_scale, bias, out_dtype)
        return out.reshape(*shape[:-1], weight.shape[0])
    if gemm == "tensorwise" and x2.shape[0] <= TENSORWISE_MAX_M:
        # cuBLASLt's per-tensor kernel with unit scales, its float32 product scaled per row and column after
        # (row-wise scales make torch take a CUTLASS kernel, 1.05-2.7x slower at M <= 64 on the H100).
        one = _UNIT_SCALES.get(x.device)
        if one is None:
            one = _UNIT_SCALES[x.device] = torch.ones((), dtype=torch.float32, device=x.device)
        acc = torch._scaled_mm(x_fp8, weight.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
        out = triton_fp8.scale_rows_cols(acc, scale_a, weight_scale, bias, out_dtype)
        return out.reshape(*shape[:-1], weight.shape[0])
    if x.is_cuda:  # CUDA's row-wise scaled matmul produces bfloat16 only
        out = torch._scaled_mm(x_fp8, weight.t(), scale_a=scale_a.contiguous(), scale_b=weight_scale.view(1, -1),
                               out_dtype=torch.bfloat16).to(out_dtype)
    else:  # the reference: float8 values in float32, scaled after the product (CPU _scaled_mm is per-tensor only
        # before torch 2.13)
        out = (torch.mm(x_fp8.float(), weight.float().t()) * scale_a * weight_scale.view(1, -1)).to(out_dtype)
    if bias is not None:
        out = out + bias
    return out.reshape(*shape[:-1], weight.shape[0])


class Fp8W8A8Apply(LinearMethod):
    """The layer holds ``weight`` (float8 [N, K]), ``weight_scale`` (float32 [N]), ``input_scale`` (None: dynamic)."""

    @staticmethod
    def reserve_kernel_workspace(layer: "LinearBase") -> None:
        if layer.device.type == "cuda" and triton_fp8 is not None and FP8_GEMM == "triton":
            triton_fp8.reserve_decode_workspace(layer.device, layer.weight.shape[0], TRITON_GEMM_MAX_M)

    def apply(self, layer: "LinearBase", x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, layer.weight, layer.weight_scale, layer.input_scale, layer.bias)


class Fp8OnlineMethod(Fp8W8A8Apply):
    """Loads the dense weight as usual, then quantizes it per output channel."""

    def create_weights(self, layer: "LinearBase") -> None:
        check_fp8_device(layer.device)
        UnquantizedLinearMethod().create_weights(layer)

    def process_weights_after_loading(self, layer: "LinearBase") -> None:
        weight, scale = quantize_fp8_per_row(layer.weight.data)
        set_tensor(layer, "weight", weight)
        set_tensor(layer, "weight_scale", scale.view(-1))
        layer.input_scale = None
        self.reserve_kernel_workspace(layer)


class Fp8CheckpointMethod(CheckpointShardsMethod, Fp8W8A8Apply):
    """float8 weights with per-tensor ([] or [1]) or per-channel ([N] or [N, 1]) ``weight_scale``."""

    shared = ("input_scale",)

    def __init__(self, static_input_scale: bool) -> None:
        self.static_input_scale = static_input_scale
        self.required = ("weight", "weight_scale") + (("input_scale",) if static_input_scale else ())

    def create_weights(self, layer: "LinearBase") -> None:
        check_fp8_device(layer.device)
        super().create_weights(layer)

    def shard_to_canonical(self, layer, tensors, num_rows):
        if tensors["weight"].dtype != FP8:
            raise ValueError(f"fp8 checkpoint weight has dtype {tensors['weight'].dtype}, expected {FP8}")
        scale = tensors["weight_scale"].float().reshape(-1)
        parts = {"weight": tensors["weight"], "weight_scale": scale.expand(num_rows) if scale.numel() == 1 else scale}
        if self.static_input_scale:
            parts["input_scale"] = tensors["input_scale"].float().reshape(1)
        return parts

    def combine_shared(self, key, values):
        return torch.stack(values).amax(dim=0)  # one static scale for the fused input: the largest shard's

    def finalize(self, layer, tensors):
        set_tensor(layer, "weight", tensors["weight"])
        set_tensor(layer, "weight_scale", tensors["weight_scale"].contiguous())
        set_tensor(layer, "input_scale", tensors.get("input_scale"))
        self.reserve_kernel_workspace(layer)


def dequantize_fp8_blockwise(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float8 [N, K] and per-block scales [ceil(N / bn), ceil(K / bk)] -> float32 [N, K]."""
    rows, cols = weight.shape
    expanded = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    if expanded.shape != weight.shape:
        raise ValueError(f"weight_scale_inv {tuple(scale_inv.shape)} does not cover a weight {tuple(weight.shape)} "
                         f"in blocks of {list(block)}")
    return weight.float() * expanded


class Fp8BlockMethod(CheckpointShardsMethod):
    required = ("weight", "weight_scale_inv")

    def __init__(self, block: tuple[int, int]) -> None:
        self.block = block

    def apply(self, layer: "LinearBase", x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.weight, layer.bias)

    def shard_to_canonical(self, layer, tensors, num_rows):
        return {"weight": dequantize_fp8_blockwise(tensors["weight"], tensors["weight_scale_inv"], self.block)
                .to(layer.dtype)}

    def finalize(self, layer, tensors):
        set_tensor(layer, "weight", tensors["weight"])
