"""Single-stream decode on the CPU from a GGUF's own 4-bit weights.

At batch 1 a CPU decode step is bound by reading the weights: the default model (SmolLM2-135M, Q4_1) reads
270 MB of bf16 linear weights per token. torch's weight-only int4 kernel (``_weight_int4pack_mm_for_cpu``)
reads a quarter of that. Measured on a 2-core AVX-512 BF16 / AMX CPU over the model's 120 projections (weights
out of cache, as in a real step): 4.1 ms int4 vs 12.5 ms packed bf16 at M = 1, 6.3 vs 12.1 ms at M = 4; the
kernel slows down past 4 rows (M = 6: 10.8 vs 12.1 ms) and is 3-5x slower than AMX from M = 16 on. So a layer
whose checkpoint tensors are all Q4_0 / Q4_1 keeps both: the file's exact 4-bit values in torch's packed int4
layout for products of at most ``max_rows`` (4) rows, and the packed bf16 weight (cpu_linear.py) for anything
larger (prefill, batched decode). That costs about 30% more memory for those weights
(0.625 bytes per weight beside bf16's 2).

A GGUF block of 32 input features maps onto the kernel's group of 32 (dequant ``(q - 8) * scale + zero``):

    Q4_0  w = d * (q - 8)    scale d, zero 0
    Q4_1  w = d * q + m      scale d, zero m + 8 d

The scales and zeros are bf16 (what the kernel takes), so they round like the dense bf16 weights do.

On by default for GGUF Q4 checkpoints on the CPU in bf16; ``SLUICE_CPU_INT4_DECODE=0`` turns it off,
``SLUICE_CPU_INT4_DECODE_MAX_ROWS`` moves the threshold. float32 models never use it.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from sluice.layers.cpu_linear import CpuPackedLinearMethod
from sluice.layers.quantization.base import _FUSED_PARTS

logger = logging.getLogger(__name__)

ENV_INT4_DECODE = "SLUICE_CPU_INT4_DECODE"
ENV_INT4_MAX_ROWS = "SLUICE_CPU_INT4_DECODE_MAX_ROWS"
GROUP_SIZE = 32  # a GGUF Q4_0 / Q4_1 block
DEFAULT_MAX_ROWS = 4  # measured (see above): int4 is 2x faster up to M = 4, about even at 6


def cpu_int4_decode_enabled(device: torch.device | str, dtype: torch.dtype) -> bool:
    return (torch.device(device).type == "cpu" and dtype == torch.bfloat16
            and os.environ.get(ENV_INT4_DECODE, "1") != "0"
            and hasattr(torch, "_weight_int4pack_mm_for_cpu"))


def unpack_q4_blocks(qtype_name: str, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw blocks ``[N, K/32, bytes]`` -> (q uint8 ``[N, K]`` in 0..15, scale float32 ``[N, K/32]``,
    zero float32 ``[N, K/32]``) with ``w = (q - 8) * scale + zero`` (the dequantization, exactly).

    A block's 16 bytes of nibbles hold features 0..15 in the low nibbles and 16..31 in the high ones."""
    blocks = np.ascontiguousarray(blocks)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if qtype_name == "Q4_0":
        zero, nibbles = np.zeros_like(d), blocks[..., 2:18]
    elif qtype_name == "Q4_1":
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        zero, nibbles = m + 8 * d, blocks[..., 4:20]
    else:
        raise ValueError(f"not a 4-bit block format: {qtype_name}")
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)  # [N, K/32, 32]
    return q.reshape(q.shape[0], -1), d, zero


class Int4Weight:
    """One weight in torch's CPU int4 layout; ``linear(x)`` == ``x @ dequantized(W).T`` (bf16 in and out)."""

    __slots__ = ("packed", "scales_and_zeros")

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        self.packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        # [K/32, N, 2]: the kernel's group-major layout
        self.scales_and_zeros = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()

    @classmethod
    def from_blocks(cls, parts: list[tuple[str, np.ndarray]]) -> "Int4Weight":
        """From the blocks of one or more checkpoint tensors (a fused layer's parts), rows concatenated."""
        unpacked = [unpack_q4_blocks(qtype_name, blocks) for qtype_name, blocks in parts]
        q, scale, zero = (torch.from_numpy(np.concatenate([u[i] for u in unpacked])) for i in range(3))
        return cls(q, scale, zero)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        out = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]).contiguous(), self.packed, GROUP_SIZE,
                                               self.scales_and_zeros)
        return out.view(*x.shape[:-1], out.shape[-1])


class CpuInt4DecodeLinearMethod(CpuPackedLinearMethod):
    """Products of at most ``max_rows`` bf16 rows on the checkpoint's int4 weight, larger ones on the packed
    bf16 weight. A dense weight changed in place after loading (its version moves) no longer matches the int4
    copy, which is then dropped for good."""

    def __init__(self, int4: Int4Weight, max_rows: int, weight_version: int) -> None:
        self.int4, self.max_rows, self.weight_version = int4, max_rows, weight_version

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        super().process_weights_after_loading(layer)
        self.weight_version = layer.weight._version

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if 0 < rows <= self.max_rows and x.dtype == torch.bfloat16 and self.int4 is not None:
            if layer.weight._version == self.weight_version:
                out = self.int4.linear(x)
                return out if layer.bias is None else out + layer.bias
            self.int4 = None
        return super().apply(layer, x)


def _checkpoint_parts(module_name: str) -> list[str]:
    prefix, _, leaf = module_name.rpartition(".")
    return [f"{prefix}.{part}" for part in _FUSED_PARTS.get(leaf, ())] or [module_name]


def attach_cpu_int4_decode(model: nn.Module, q4_blocks: Mapping, max_rows: int | None = None) -> list[str]:
    """Gives every packed bf16 linear layer whose checkpoint tensors are all in ``q4_blocks`` (HF module name ->
    ``gguf_loader.Q4Blocks``) the int4 decode method; returns those layers' names. Others stay as they are."""
    if max_rows is None:
        max_rows = int(os.environ.get(ENV_INT4_MAX_ROWS, DEFAULT_MAX_ROWS))
    attached = []
    for name, module in model.named_modules():
        if type(getattr(module, "linear_method", None)) is not CpuPackedLinearMethod:
            continue
        if module.tp_size != 1 or module.weight.dtype != torch.bfloat16 or module.input_size % GROUP_SIZE:
            continue
        parts = [q4_blocks.get(part) for part in _checkpoint_parts(name)]
        if any(p is None for p in parts):
            continue
        int4 = Int4Weight.from_blocks([(p.qtype.name, p.blocks) for p in parts])
        if tuple(int4.scales_and_zeros.shape[:2]) != (module.input_size // GROUP_SIZE, module.output_size):
            raise ValueError(f"{name}: the checkpoint's 4-bit blocks do not match the layer's "
                             f"{module.output_size} x {module.input_size} weight")
        # the packed bf16 weight made by pack_cpu_weights is kept for the larger products
        method = CpuInt4DecodeLinearMethod(int4, max_rows, module.weight._version)
        module.linear_method = method
        attached.append(name)
    if attached:
        kinds = sorted({name.rpartition(".")[2] for name in attached})
        logger.info("CPU int4 decode: %d linear layers (%s) run products of <= %d rows on the GGUF's 4-bit "
                    "weights, larger ones on bf16 (%s=0 turns it off)", len(attached), ", ".join(kinds),
                    max_rows, ENV_INT4_DECODE)
    return attached
