"""Writes a tiny float32 Llama in each quantized on-disk format, with packing written here independently of
sluice, plus the float32 weights those formats dequantize to (the reference each test compares against)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FP8 = torch.float8_e4m3fn
LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)

STATIC_INPUT_SCALES = {"q_proj": 0.010, "k_proj": 0.014, "v_proj": 0.012, "o_proj": 0.004,
                       "gate_proj": 0.011, "up_proj": 0.013, "down_proj": 0.003}

# quantizer(name, W [N, K] float32) -> (checkpoint tensors by suffix, dequantized float32 W)
Quantizer = Callable[[str, torch.Tensor], tuple[dict[str, torch.Tensor], torch.Tensor]]


def pack_rows_of_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes [R, C] (unsigned) -> int32 [R, C * bits / 32]: code c of each word at bits c * bits."""
    per_word = 32 // bits
    rows, cols = codes.shape
    grouped = codes.astype(np.uint64).reshape(rows, cols // per_word, per_word)
    words = np.zeros((rows, cols // per_word), dtype=np.uint64)
    for slot in range(per_word):
        words |= grouped[:, :, slot] << np.uint64(slot * bits)
    return words.astype(np.uint32).view(np.int32)


def _asym_group_quant(w: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, g] -> (codes, zero [N], fp16-rounded scale [N]) with w ~= (codes - zero) * scale."""
    lo, hi = w.min(dim=1).values.clamp(max=0), w.max(dim=1).values.clamp(min=0)
    scale = ((hi - lo) / maxq).clamp(min=1e-6).half().float()
    zero = torch.round(-lo / scale).clamp(0, maxq)
    codes = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, maxq)
    return codes, zero, scale


def _sym_group_quant(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    half = 1 << (bits - 1)
    scale = (w.abs().max(dim=1).values / (half - 1)).clamp(min=1e-6).half().float()
    codes = torch.clamp(torch.round(w / scale[:, None]) + half, 0, 2 * half - 1)
    return codes, torch.full_like(scale, half), scale


def group_quantize(w: torch.Tensor, g_idx: torch.Tensor, bits: int, sym: bool):
    """Per group of input channels (g_idx), returns codes [N, K], zeros [N, G], scales [N, G] and the dequantized W."""
    num_groups = int(g_idx.max()) + 1
    codes = torch.empty_like(w)
    zeros, scales = torch.empty(w.shape[0], num_groups), torch.empty(w.shape[0], num_groups)
    for group in range(num_groups):
        cols = (g_idx == group).nonzero().view(-1)
        c, z, s = _sym_group_quant(w[:, cols], bits) if sym else _asym_group_quant(w[:, cols], (1 << bits) - 1)
        codes[:, cols], zeros[:, group], scales[:, group] = c, z, s
    deq = (codes - zeros[:, g_idx]) * scales[:, g_idx]
    return codes.to(torch.int64), zeros.to(torch.int64), scales, deq


def awq_quantizer(group_size: int = 32) -> Quantizer:
    def quantize(name, w):
        g_idx = torch.arange(w.shape[1]) // group_size
        codes, zeros, scales, deq = group_quantize(w, g_idx, 4, sym=False)

        def awq_pack(values: torch.Tensor) -> torch.Tensor:  # [R, N] -> [R, N / 8], interleaved
            v = values.numpy()
            reordered = np.concatenate([v[:, j * 8:(j + 1) * 8][:, list(AWQ_ORDER)] for j in range(v.shape[1] // 8)], 1)
            return torch.from_numpy(pack_rows_of_codes(reordered, 4))
        return {"qweight": awq_pack(codes.t()), "qzeros": awq_pack(zeros.t()), "scales": scales.t().half()}, deq
    return quantize


def gptq_quantizer(bits: int = 4, group_size: int = 32, desc_act: bool = False, sym: bool = True,
                   seed: int = 0) -> Quantizer:
    def quantize(name, w):
        in_features = w.shape[1]
        if desc_act:  # groups over a permuted channel order (as GPTQ with act-order leaves them)
            perm = torch.randperm(in_features, generator=torch.Generator().manual_seed(seed + in_features))
            g_idx = torch.empty(in_features, dtype=torch.int64)
            g_idx[perm] = torch.arange(in_features) // group_size
        else:
            g_idx = torch.arange(in_features) // group_size
        codes, zeros, scales, deq = group_quantize(w, g_idx, bits, sym)
        qweight = torch.from_numpy(pack_rows_of_codes(codes.numpy(), bits).T.copy())  # [K / per_word, N]
        qzeros = torch.from_numpy(pack_rows_of_codes((zeros - 1).t().numpy(), bits))  # stored minus one
        return {"qweight": qweight, "qzeros": qzeros, "scales": scales.t().half(), "g_idx": g_idx.int()}, deq
    return quantize


def ct_w4a16_quantizer(group_size: int = 32) -> Quantizer:
    def quantize(name, w):
        g_idx = torch.arange(w.shape[1]) // group_size
        codes, _, scales, deq = group_quantize(w, g_idx, 4, sym=True)
        return {"weight_packed": torch.from_numpy(pack_rows_of_codes(codes.numpy(), 4)),
                "weight_scale": scales.half(), "weight_shape": torch.tensor(list(w.shape))}, deq
    return quantize


def fp8_per_tensor_quantizer(static_input_scale: bool) -> Quantizer:
    def quantize(name, w):
        scale = w.abs().max() / torch.finfo(FP8).max
        q = (w / scale).to(FP8)
        tensors = {"weight": q, "weight_scale": scale.reshape(())}
        if static_input_scale:  # different per projection, so fused layers must take the largest
            tensors["input_scale"] = torch.tensor(STATIC_INPUT_SCALES[name.split(".")[-2]])
        return tensors, q.float() * scale
    return quantize


def fp8_per_channel_quantizer() -> Quantizer:
    def quantize(name, w):
        scale = w.abs().amax(dim=1, keepdim=True) / torch.finfo(FP8).max
        q = (w / scale).to(FP8)
        return {"weight": q, "weight_scale": scale}, q.float() * scale
    return quantize


def fp8_block_quantizer(block: int) -> Quantizer:
    def quantize(name, w):
        rows, cols = w.shape
        nb_r, nb_c = -(-rows // block), -(-cols // block)
        scale_inv = torch.empty(nb_r, nb_c)
        q = torch.empty(rows, cols, dtype=FP8)
        deq = torch.empty_like(w)
        for i in range(nb_r):
            for j in range(nb_c):
                tile = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
                s = tile.abs().max() / torch.finfo(FP8).max
                qt = (tile / s).to(FP8)
                scale_inv[i, j] = s
                q[i * block:(i + 1) * block, j * block:(j + 1) * block] = qt
                deq[i * block:(i + 1) * block, j * block:(j + 1) * block] = qt.float() * s
        return {"weight": q, "weight_scale_inv": scale_inv}, deq
    return quantize


def write_quantized(src: Path, dst: Path, quantizer: Quantizer, quantization_config: dict,
                    ignore: re.Pattern | None = None) -> dict[str, torch.Tensor]:
    """Writes ``dst`` (config.json with ``quantization_config`` + quantized tensors); returns every linear
    weight's float32 dequantization by HF module name (ignored layers: their original weight)."""
    tensors = load_file(str(src / "model.safetensors"))
    out, dequantized = {}, {}
    for name, w in tensors.items():
        module = name.removesuffix(".weight")
        if LINEAR.match(name) and not (ignore and ignore.search(module)):
            parts, dequantized[module] = quantizer(name, w.float())
            out.update({f"{module}.{suffix}": t.contiguous() for suffix, t in parts.items()})
        else:
            out[name] = w
            if LINEAR.match(name):
                dequantized[module] = w.float()
    dst.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(config))
    return dequantized


def write_dense(src: Path, dst: Path, dequantized: dict[str, torch.Tensor]) -> Path:
    """The same model with each linear weight replaced by its dequantization (float32, no quantization_config)."""
    tensors = load_file(str(src / "model.safetensors"))
    for module, w in dequantized.items():
        tensors[f"{module}.weight"] = w.contiguous()
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst / "model.safetensors"))
    shutil.copy(src / "config.json", dst / "config.json")
    return dst
