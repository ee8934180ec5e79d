"""Weight-only integer quantization (4-bit, and 8-bit GPTQ): AWQ, GPTQ and compressed-tensors pack-quantized.

Each format's packed tensors become one canonical form per shard, output features first:

    codes   uint8 [N, K]   unsigned integer weights
    zeros   float [N, G]   zero point per group (in code units)
    scales  float [N, G]
    g_idx   long  [K]      group of each input channel (GPTQ act-order permutes it; otherwise k // group_size)

    W[n, k] = (codes[n, k] - zeros[n, g_idx[k]]) * scales[n, g_idx[k]]     (computed in float32)

Packed layouts (int32 words, lowest bits first):

    AWQ (GEMM)        qweight [K, N / 8], qzeros [G, N / 8]: word j holds columns 8j + (0, 2, 4, 6, 1, 3, 5, 7)
    GPTQ              qweight [K / (32 / bits), N] packed along K; qzeros [G, N / (32 / bits)] along N, stored
                      minus one (checkpoint_format "gptq"; "gptq_v2" stores them as is)
    pack-quantized    weight_packed [N, K / 8] along K, codes offset by 8 (symmetric, no zero point tensor)

On the CPU the dense weight is dequantized once at load (the reference path). On CUDA every format is
repacked at load into triton_w4a16.py's layout (int32 words along K, act-order channels sorted by group)
and the Triton GEMM dequantizes in registers; without Triton the codes stay in uint8 and each call
dequantizes into the model dtype before the matmul.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from sluice.layers.quantization.base import CheckpointShardsMethod, UnquantizedLinearMethod, set_tensor

try:  # the CUDA kernel; without Triton, CUDA layers dequantize per call
    from sluice.layers.quantization import triton_w4a16
except ImportError:
    triton_w4a16 = None

if TYPE_CHECKING:
    from sluice.layers.linear import LinearBase

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # the column each 4-bit slot of an AWQ word holds, slot 0 lowest


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words holding 32 / bits codes each, lowest bits first, unpacked along ``dim`` (0 or 1)."""
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32)
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [..., per_word]
    if dim == 1:
        return codes.reshape(packed.shape[0], packed.shape[1] * per_word).to(torch.uint8)
    return codes.permute(0, 2, 1).reshape(packed.shape[0] * per_word, packed.shape[1]).to(torch.uint8)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """AWQ [R, N / 8] -> uint8 [R, N] with the interleaved column order undone."""
    slots = unpack_int32(packed, 4, 1).view(packed.shape[0], -1, 8)
    columns = torch.empty_like(slots)
    columns[..., list(AWQ_ORDER)] = slots
    return columns.view(packed.shape[0], -1)


def dequantize(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    return (codes.float() - zeros.float()[:, g_idx]) * scales.float()[:, g_idx]


def default_g_idx(in_features: int, group_size: int, device: torch.device) -> torch.Tensor:
    group = in_features if group_size == -1 else group_size
    if in_features % group:
        raise ValueError(f"group_size {group_size} does not divide the {in_features} input features")
    return torch.arange(in_features, device=device) // group


class WeightOnlyIntMethod(CheckpointShardsMethod):
    shared = ("g_idx",)

    def __init__(self, bits: int, group_size: int) -> None:
        self.bits, self.group_size = bits, group_size
        self.mode = "dense"  # dense (CPU: dequantized once) | triton (CUDA kernel) | per_call (CUDA, no kernel)
        self.kernel_shape: tuple[int, int, int] = (0, 0, 0)  # group_size in kernel order, in and out features

    def finalize(self, layer: "LinearBase", tensors: dict[str, torch.Tensor]) -> None:
        if layer.device.type == "cpu":
            set_tensor(layer, "weight", dequantize(**tensors).to(layer.dtype))
            self.mode = "dense"
            return
        packed = None
        if triton_w4a16 is not None and layer.dtype in triton_w4a16.ACTIVATION_DTYPES:
            packed = triton_w4a16.pack_canonical(**tensors, bits=self.bits, dtype=layer.dtype)
        if packed is not None:
            self.mode = "triton"
            set_tensor(layer, "qweight", packed.qweight)
            set_tensor(layer, "scales", packed.scales)
            set_tensor(layer, "zeros", packed.zeros)
            layer.register_buffer("perm", packed.perm)
            self.kernel_shape = (packed.group_size, packed.in_features, packed.out_features)
            triton_w4a16.reserve_decode_workspace(layer.device, packed.out_features)
            return
        self.mode = "per_call"
        set_tensor(layer, "codes", tensors["codes"].contiguous())
        set_tensor(layer, "zeros", tensors["zeros"].to(layer.dtype))
        set_tensor(layer, "scales", tensors["scales"].to(layer.dtype))
        layer.register_buffer("g_idx", tensors["g_idx"])

    def apply(self, layer: "LinearBase", x: torch.Tensor) -> torch.Tensor:
        if self.mode == "dense":
            return F.linear(x, layer.weight, layer.bias)
        if self.mode == "triton":
            group_size, in_features, out_features = self.kernel_shape
            packed = triton_w4a16.PackedWeight(layer.qweight, layer.scales, layer.zeros, layer.perm, self.bits,
                                               group_size, in_features, out_features)
            return triton_w4a16.w4a16_gemm(x, packed, layer.bias)
        weight = dequantize(layer.codes, layer.zeros, layer.scales, layer.g_idx).to(x.dtype)
        return F.linear(x, weight, layer.bias)


class AWQMethod(WeightOnlyIntMethod):
    required = ("qweight", "qzeros", "scales")

    def shard_to_canonical(self, layer, tensors, num_rows):
        codes = unpack_awq(tensors["qweight"]).t()
        return {"codes": codes, "zeros": unpack_awq(tensors["qzeros"]).t().float(),
                "scales": tensors["scales"].t().float(),
                "g_idx": default_g_idx(codes.shape[1], self.group_size, codes.device)}


class GPTQMethod(WeightOnlyIntMethod):
    required = ("qweight", "qzeros", "scales")
    optional = ("g_idx",)

    def __init__(self, bits: int, group_size: int, zeros_minus_one: bool) -> None:
        super().__init__(bits, group_size)
        self.zeros_minus_one = zeros_minus_one

    def shard_to_canonical(self, layer, tensors, num_rows):
        codes = unpack_int32(tensors["qweight"], self.bits, 0).t()
        zeros = unpack_int32(tensors["qzeros"], self.bits, 1).t().float() + (1 if self.zeros_minus_one else 0)
        g_idx = tensors.get("g_idx")
        g_idx = default_g_idx(codes.shape[1], self.group_size, codes.device) if g_idx is None else g_idx.long()
        return {"codes": codes, "zeros": zeros, "scales": tensors["scales"].t().float(), "g_idx": g_idx}


class PackQuantizedMethod(WeightOnlyIntMethod):
    """compressed-tensors ``pack-quantized``, symmetric: codes are the signed integers plus 2^(bits-1)."""

    required = ("weight_packed", "weight_scale")
    optional = ("weight_shape",)

    def shard_to_canonical(self, layer, tensors, num_rows):
        codes = unpack_int32(tensors["weight_packed"], self.bits, 1)
        if "weight_shape" in tensors:
            codes = codes[:, : int(tensors["weight_shape"].reshape(-1)[1])]
        scales = tensors["weight_scale"].float().reshape(codes.shape[0], -1)
        group = codes.shape[1] if self.group_size == -1 else self.group_size
        return {"codes": codes, "zeros": torch.full_like(scales, 1 << (self.bits - 1)), "scales": scales,
                "g_idx": default_g_idx(codes.shape[1], group, codes.device)}


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int) -> dict[str, torch.Tensor]:
    """Round to nearest, asymmetric, per group of ``group_size`` input channels: the canonical form of ``weight``."""
    rows, cols = weight.shape
    g_idx = default_g_idx(cols, group_size, weight.device)
    groups = weight.float().reshape(rows, -1, cols if group_size == -1 else group_size)
    low = groups.amin(dim=-1).clamp(max=0)
    high = groups.amax(dim=-1).clamp(min=0)
    maxq = (1 << bits) - 1
    # Divided by a tensor, not a Python number: CUDA divides by a scalar as a multiply by its reciprocal, which
    # can land an ulp away from the CPU's quotient and flip a code at a rounding boundary.
    scales = ((high - low) / torch.full_like(high, maxq)).clamp(min=1e-10)
    zeros = (-low / scales).round().clamp(0, maxq)
    codes = (groups / scales.unsqueeze(-1)).round() + zeros.unsqueeze(-1)
    return {"codes": codes.clamp(0, maxq).to(torch.uint8).reshape(rows, cols), "zeros": zeros, "scales": scales,
            "g_idx": g_idx}


class RtnMethod(WeightOnlyIntMethod):
    """``--quantization rtn``: a 16/32-bit checkpoint (or dummy weights) quantized at load to 4-bit codes,
    round to nearest, asymmetric, group 128; then the same compute form and kernels as AWQ/GPTQ."""

    def __init__(self, bits: int = 4, group_size: int = 128) -> None:
        super().__init__(bits, group_size)

    def create_weights(self, layer: "LinearBase") -> None:
        UnquantizedLinearMethod().create_weights(layer)

    def process_weights_after_loading(self, layer: "LinearBase") -> None:
        group_size = self.group_size if layer.input_size % max(self.group_size, 1) == 0 else -1
        tensors = quantize_rtn(layer.weight.data, self.bits, group_size)
        del layer.weight
        self.finalize(layer, tensors)
