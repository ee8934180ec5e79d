"""The W4A16 Triton GEMM computes what the dequantize-then-matmul reference (w4a16.dequantize) computes,
for every checkpoint format's canonical form after repacking: AWQ, GPTQ (sym/asym, act-order, 8-bit),
compressed-tensors pack-quantized, online RTN; group sizes 32/64/128 and per channel; decode and prefill row counts.

Runs on CUDA; skipped without it. Without a GPU, under the Triton interpreter:

    TRITON_INTERPRET=1 python -m pytest -q tests/gpu/test_triton_w4a16.py
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from sluice.layers.quantization.w4a16 import AWQMethod, GPTQMethod, PackQuantizedMethod, dequantize, quantize_rtn
from tests.quantization import checkpoints as ckpt

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if INTERPRET else None)
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE is None, reason="needs CUDA (or TRITON_INTERPRET=1 for the interpreter)")]
triton_w4a16 = pytest.importorskip("sluice.layers.quantization.triton_w4a16")

BF16 = pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.skipif(INTERPRET, reason="interpreter bf16"))


def _format(name: str, bits: int, group_size: int):
    """(checkpoint quantizer, the method that reads it) for one format."""
    if name == "awq":
        return ckpt.awq_quantizer(group_size), AWQMethod(bits, group_size)
    if name == "ct":
        return ckpt.ct_w4a16_quantizer(group_size), PackQuantizedMethod(bits, group_size)
    sym, act_order = name in ("gptq_sym", "gptq_sym_act_order"), name.endswith("act_order")
    return (ckpt.gptq_quantizer(bits, group_size, desc_act=act_order, sym=sym),
            GPTQMethod(bits, group_size, zeros_minus_one=True))


def _canonical(fmt: str, bits: int, group_size: int, n: int, k: int, seed: int):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * k ** -0.5
    if fmt == "rtn":  # --quantization rtn: quantized at load
        return quantize_rtn(w, bits, group_size)
    quantizer, method = _format(fmt, bits, group_size)
    tensors, _ = quantizer("layer.weight", w)
    return method.shard_to_canonical(None, tensors, n)


def _check(fmt, bits, group_size, m, n, k, dtype, bias=False, config=None, seed=0, dense_min_m=None):
    canonical = _canonical(fmt, bits, group_size, n, k, seed)
    packed = triton_w4a16.pack_canonical(**canonical, bits=bits, dtype=dtype)
    assert packed is not None
    assert (packed.perm is not None) == fmt.endswith("act_order")
    packed = triton_w4a16.PackedWeight(packed.qweight.to(DEVICE), packed.scales.to(DEVICE), packed.zeros.to(DEVICE),
                                       None if packed.perm is None else packed.perm.to(DEVICE), packed.bits,
                                       packed.group_size, packed.in_features, packed.out_features)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    b = torch.randn(n, generator=torch.Generator().manual_seed(seed + 2)).to(dtype) if bias else None
    # The reference: the dense weight from the layer's own (dtype-rounded) scales and zeros, float32 matmul.
    weight = dequantize(canonical["codes"], canonical["zeros"].to(dtype), canonical["scales"].to(dtype),
                        canonical["g_idx"]).to(dtype)
    expected = x.float() @ weight.float().t() + (0 if b is None else b.float())
    out = triton_w4a16.w4a16_gemm(x.to(DEVICE), packed, None if b is None else b.to(DEVICE), config,
                                  dense_min_m).cpu()
    assert out.dtype == dtype and out.shape == (m, n)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    scale = expected.abs().max().item()
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=tol * scale)


FORMATS = ["awq", "gptq_sym", "gptq_asym", "gptq_sym_act_order", "gptq_asym_act_order", "ct", "rtn"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_every_format_and_group_size_matches_the_reference(fmt, group_size):
    _check(fmt, 4, group_size, m=3, n=48, k=4 * group_size, dtype=torch.float16, seed=group_size)


@pytest.mark.parametrize("m", [1, 2, 5, 16, 17, 33, 64, 65, 130, 300])
def test_decode_and_prefill_row_counts(m):
    _check("gptq_asym_act_order", 4, 64, m=m, n=80, k=256, dtype=torch.float16, bias=m % 2 == 1, seed=m)


@pytest.mark.parametrize("dtype", [torch.float16, BF16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_activation_dtypes(dtype):
    _check("awq", 4, 32, m=7, n=64, k=192, dtype=dtype, bias=True)


def test_eight_bit_gptq():
    _check("gptq_sym", 8, 64, m=4, n=40, k=256, dtype=torch.float16)
    _check("gptq_asym_act_order", 8, 32, m=20, n=24, k=128, dtype=torch.float16)


@pytest.mark.parametrize("reduce", ["atomic", "partials"])
@pytest.mark.parametrize("config", [
    triton_w4a16.W4A16KernelConfig(16, 32, 64, split_k=3),    # K slices that end inside a step
    triton_w4a16.W4A16KernelConfig(16, 64, 128, split_k=2),   # BLOCK_K across two 64-groups
    triton_w4a16.W4A16KernelConfig(32, 32, 32, split_k=1),
], ids=["split3", "block_k_over_groups", "no_split"])
def test_split_k_and_tiles_that_cross_groups(config, reduce):
    config = dataclasses.replace(config, reduce=reduce)
    _check("gptq_asym_act_order", 4, 64, m=9, n=72, k=320, dtype=torch.float16, bias=True, config=config)


def test_the_split_k_workspace_is_left_zeroed_for_the_next_call():
    from sluice.layers.quantization import triton_splitk

    config = triton_w4a16.W4A16KernelConfig(16, 32, 64, split_k=4)
    for m in (3, 16, 5):  # a later call reuses the workspace and counters the earlier ones used
        _check("awq", 4, 32, m=m, n=64, k=256, dtype=torch.float16, bias=True, config=config, seed=m)
        values, counters = triton_splitk._WORKSPACES[triton_splitk._device_key(DEVICE)]
        assert not values.any() and not counters.any()


def test_channelwise_scales():
    canonical = _canonical("ct", 4, 32, 40, 96, seed=3)
    scales = canonical["scales"][:, :1].contiguous()  # one group per output channel
    canonical = {**canonical, "scales": scales, "zeros": canonical["zeros"][:, :1].contiguous(),
                 "g_idx": torch.zeros(96, dtype=torch.long)}
    packed = triton_w4a16.pack_canonical(**canonical, bits=4, dtype=torch.float16)
    assert packed.group_size == 96 and packed.perm is None
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(4)).half()
    expected = x.float() @ dequantize(canonical["codes"], canonical["zeros"].half(), scales.half(),
                                      canonical["g_idx"]).half().float().t()
    packed = triton_w4a16.PackedWeight(packed.qweight.to(DEVICE), packed.scales.to(DEVICE), packed.zeros.to(DEVICE),
                                       None, 4, 96, 96, 40)
    out = triton_w4a16.w4a16_gemm(x.to(DEVICE), packed).cpu().float()
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-3 * expected.abs().max().item())


def test_unequal_groups_are_left_to_the_torch_path():
    canonical = _canonical("gptq_asym", 4, 32, 16, 64, seed=5)
    g_idx = torch.tensor([0] * 40 + [1] * 24)
    assert triton_w4a16.pack_canonical(**{**canonical, "g_idx": g_idx}, bits=4, dtype=torch.float16) is None


def test_packing_round_trips():
    codes = torch.randint(0, 16, (64, 24), generator=torch.Generator().manual_seed(6), dtype=torch.uint8)
    words = triton_w4a16.pack_along_k(codes, 4)
    from sluice.layers.quantization.w4a16 import unpack_int32
    assert torch.equal(unpack_int32(words, 4, 0), codes)


@pytest.mark.parametrize("dequant", ["half", "magic32", "f32"])
@pytest.mark.parametrize("unpack", ["reshape", "gather"])
@pytest.mark.parametrize("fmt,bits", [("gptq_asym_act_order", 4), ("gptq_sym", 8)])
def test_every_dequantization_and_unpacking_gives_the_same_weights(dequant, unpack, fmt, bits):
    config = triton_w4a16.W4A16KernelConfig(16, 32, 64, split_k=2, dequant=dequant, unpack=unpack)
    _check(fmt, bits, 32, m=6, n=40, k=192, dtype=torch.float16, bias=True, config=config)


def test_sixteen_bit_dequantization_is_chosen_only_where_it_is_exact():
    canonical = _canonical("awq", 4, 32, 16, 64, seed=9)
    bf16_4bit = triton_w4a16.pack_canonical(**canonical, bits=4, dtype=torch.bfloat16)
    assert triton_w4a16._dequant_mode("auto", torch.bfloat16, bf16_4bit) == "half"
    assert triton_w4a16._dequant_mode("auto", torch.float32, bf16_4bit) == "magic32"
    assert triton_w4a16._dequant_mode("auto", torch.float16, bf16_4bit) == "magic32"  # scales of another dtype
    bf16_8bit = dataclasses.replace(bf16_4bit, bits=8)
    assert triton_w4a16._dequant_mode("half", torch.bfloat16, bf16_8bit) == "magic32"  # 128 + 255 is not exact


def test_packing_sets_the_sign_bit_like_the_checkpoints_do():
    """The top code of a word lands in bits 28..31 (4-bit) or 24..31 (8-bit), as GPTQ's int32 words hold it."""
    from sluice.layers.quantization.w4a16 import unpack_int32

    for bits in (4, 8):
        codes = torch.full((32 // bits, 3), (1 << bits) - 1, dtype=torch.uint8)
        codes[:, 1] = torch.arange(32 // bits, dtype=torch.uint8)
        words = triton_w4a16.pack_along_k(codes, bits)
        assert words[0, 0].item() == -1
        assert torch.equal(unpack_int32(words, bits, 0), codes)
        expected = torch.from_numpy(ckpt.pack_rows_of_codes(codes.t().numpy(), bits).T.copy())
        assert torch.equal(words, expected)


@pytest.mark.parametrize("m", [1, 12, 40])
def test_default_decode_tiles_split_k(m):
    config = triton_w4a16.default_config(m, 64, 2048, torch.device(DEVICE))
    assert config.split_k > 1
    _check("gptq_asym", 4, 128, m=m, n=64, k=2048, dtype=torch.float16, bias=True, seed=m)


@pytest.mark.parametrize("dequant", ["half", "magic32", "f32"])
@pytest.mark.parametrize("fmt,bits,group_size", [("gptq_asym_act_order", 4, 32), ("awq", 4, 128), ("gptq_sym", 8, 64)])
def test_dequantized_weights_equal_the_reference_bit_for_bit(dequant, fmt, bits, group_size):
    canonical = _canonical(fmt, bits, group_size, 40, 256, seed=11)
    packed = triton_w4a16.pack_canonical(**canonical, bits=bits, dtype=torch.float16)
    expected = dequantize(canonical["codes"], canonical["zeros"].half(), canonical["scales"].half(),
                          canonical["g_idx"]).half()
    if packed.perm is not None:
        expected = expected[:, packed.perm]  # the kernel's K order
    device_packed = dataclasses.replace(packed, qweight=packed.qweight.to(DEVICE), scales=packed.scales.to(DEVICE),
                                        zeros=packed.zeros.to(DEVICE))
    dense = triton_w4a16.w4a16_dequantize(device_packed, torch.float16, dequant).cpu()
    assert dense.shape == (256, 40)
    assert torch.equal(dense.t(), expected)


def test_long_prefills_multiply_a_dequantized_weight():
    _check("gptq_asym_act_order", 4, 64, m=40, n=72, k=256, dtype=torch.float16, bias=True, dense_min_m=32)
    _check("awq", 4, 32, m=8, n=48, k=128, dtype=torch.float32, dense_min_m=1)
