"""The FP8 W8A8 Triton kernels compute what fp8.py's torch reference computes: the activation quantization
bit for bit (float8 values and float32 scales, per token and static), the small-M GEMM up to float32 sum order.

Runs on CUDA; skipped without it. Without a GPU, under the Triton interpreter:

    TRITON_INTERPRET=1 python -m pytest -q tests/gpu/test_triton_fp8.py
"""
from __future__ import annotations

import os

import pytest
import torch

from sluice.layers.quantization.fp8 import FP8, quantize_fp8_per_row, quantize_fp8_static

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if INTERPRET else None)
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE is None, reason="needs CUDA (or TRITON_INTERPRET=1 for the interpreter)")]
if DEVICE == "cuda" and torch.cuda.get_device_capability() < (8, 9):
    pytestmark.append(pytest.mark.skip(reason="fp8 needs compute capability 8.9+"))
triton_fp8 = pytest.importorskip("sluice.layers.quantization.triton_fp8")

BF16 = pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.skipif(INTERPRET, reason="interpreter bf16"))


def _activations(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * 3
    x[:, ::7] *= 20  # outliers: the per-token scale follows each row's largest
    if m > 1:
        x[1] = 0  # an all-zero row takes the 1e-12 floor
    return x.to(dtype)


@pytest.mark.parametrize("m,k", [(1, 64), (3, 100), (17, 256), (300, 48), (2, 4096), (2, 5000)])
@pytest.mark.parametrize("dtype", [torch.float16, BF16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_per_token_quantization_equals_the_reference(m, k, dtype):
    x = _activations(m, k, dtype, seed=m + k)
    q, scales = triton_fp8.quantize_activations(x.to(DEVICE))
    expected_q, expected_scales = quantize_fp8_per_row(x)
    assert q.dtype == FP8 and q.shape == (m, k) and scales.shape == (m, 1) and scales.dtype == torch.float32
    assert torch.equal(scales.cpu(), expected_scales)
    assert torch.equal(q.cpu().view(torch.uint8), expected_q.view(torch.uint8))


@pytest.mark.parametrize("m,k", [(1, 64), (9, 200), (2, 5000)])
def test_static_quantization_equals_the_reference_and_saturates(m, k):
    x = _activations(m, k, torch.float16, seed=k)
    input_scale = torch.tensor([0.05])  # small: large activations clamp at +-448
    q, scales = triton_fp8.quantize_activations(x.to(DEVICE), input_scale.to(DEVICE))
    assert torch.equal(scales.cpu(), input_scale.expand(m, 1))
    assert torch.equal(q.cpu().view(torch.uint8), quantize_fp8_static(x, input_scale).view(torch.uint8))
    assert q.float().abs().max().item() == 448.0


def _gemm_case(m: int, n: int, k: int, seed: int):
    x_fp8, scale_a = quantize_fp8_per_row(_activations(m, k, torch.float32, seed))
    weight, weight_scale = quantize_fp8_per_row(torch.randn(n, k, generator=torch.Generator().manual_seed(seed + 1)))
    return x_fp8, scale_a, weight, weight_scale.view(-1)


@pytest.mark.parametrize("m,n,k", [(1, 64, 256), (4, 72, 384), (16, 48, 128), (17, 40, 200), (64, 96, 512),
                                   (33, 64, 1024)])
@pytest.mark.parametrize("dtype", [torch.float16, BF16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_small_m_gemm_matches_the_reference(m, n, k, dtype):
    x_fp8, scale_a, weight, weight_scale = _gemm_case(m, n, k, seed=m * n)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(k)).to(dtype) if m % 2 else None
    expected = torch.mm(x_fp8.float(), weight.float().t()) * scale_a * weight_scale.view(1, -1)
    if bias is not None:
        expected += bias.float()
    out = triton_fp8.fp8_gemm(x_fp8.to(DEVICE), scale_a.to(DEVICE), weight.to(DEVICE), weight_scale.to(DEVICE),
                              None if bias is None else bias.to(DEVICE), dtype).cpu()
    assert out.dtype == dtype and out.shape == (m, n)
    # Hopper's fp8 tensor cores accumulate with fewer than float32's bits: float32 output gets 1e-4 on CUDA
    tol = {torch.float32: 1e-4 if DEVICE == "cuda" else 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=tol * expected.abs().max().item())


@pytest.mark.parametrize("config", [triton_fp8.Fp8GemmConfig(16, 32, 64, split_k=3),
                                    triton_fp8.Fp8GemmConfig(32, 64, 32, split_k=1)], ids=["split3", "no_split"])
def test_gemm_split_k_and_tiles(config):
    x_fp8, scale_a, weight, weight_scale = _gemm_case(20, 70, 330, seed=7)
    bias = torch.randn(70, generator=torch.Generator().manual_seed(8))
    expected = torch.mm(x_fp8.float(), weight.float().t()) * scale_a * weight_scale.view(1, -1) + bias
    out = triton_fp8.fp8_gemm(x_fp8.to(DEVICE), scale_a.to(DEVICE), weight.to(DEVICE), weight_scale.to(DEVICE),
                              bias.to(DEVICE), torch.float32, config).cpu()
    torch.testing.assert_close(out, expected, rtol=0, atol=(1e-4 if DEVICE == "cuda" else 1e-5) * expected.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp8_linear takes the kernels on CUDA only")
@pytest.mark.parametrize("m", [1, 8, 64, 65, 300])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_fp8_linear_paths_agree_on_cuda(m, static):
    from sluice.layers.quantization.fp8 import fp8_linear

    x = _activations(m, 512, torch.bfloat16, seed=m).cuda()
    weight, weight_scale = quantize_fp8_per_row(torch.randn(256, 512, generator=torch.Generator().manual_seed(1)))
    weight, weight_scale = weight.cuda(), weight_scale.view(-1).cuda()
    input_scale = torch.tensor([0.1], device="cuda") if static else None
    reference = fp8_linear(x.cpu().float(), weight.cpu(), weight_scale.cpu(), None if input_scale is None
                           else input_scale.cpu(), None)
    for quant in ("torch", "triton"):
        for gemm in ("scaled_mm", "triton", "tensorwise"):
            out = fp8_linear(x, weight, weight_scale, input_scale, None, gemm=gemm, quant=quant).float().cpu()
            torch.testing.assert_close(out, reference, rtol=2e-2, atol=2e-2 * reference.abs().max().item())


def test_gemm_without_a_workspace_sums_float32_partials(monkeypatch):
    """While a CUDA graph is captured the workspace cannot grow: the K slices then write partials."""
    from sluice.layers.quantization import triton_splitk

    monkeypatch.setattr(triton_splitk, "workspace", lambda *args: None)
    x_fp8, scale_a, weight, weight_scale = _gemm_case(5, 40, 512, seed=9)
    bias = torch.randn(40, generator=torch.Generator().manual_seed(10))
    expected = torch.mm(x_fp8.float(), weight.float().t()) * scale_a * weight_scale.view(1, -1) + bias
    out = triton_fp8.fp8_gemm(x_fp8.to(DEVICE), scale_a.to(DEVICE), weight.to(DEVICE), weight_scale.to(DEVICE),
                              bias.to(DEVICE), torch.float32, triton_fp8.Fp8GemmConfig(16, 32, 64, split_k=4)).cpu()
    torch.testing.assert_close(out, expected, rtol=0, atol=(1e-4 if DEVICE == "cuda" else 1e-5) * expected.abs().max().item())


def test_gemm_takes_a_per_tensor_scale_expanded_to_the_rows():
    """A static (checkpoint) input scale arrives as one value expanded to [M, 1] (stride 0): every row uses it."""
    x_fp8, _, weight, weight_scale = _gemm_case(8, 64, 256, seed=11)
    scale_a = torch.tensor([[0.05]]).expand(8, 1)
    expected = torch.mm(x_fp8.float(), weight.float().t()) * 0.05 * weight_scale.view(1, -1)
    out = triton_fp8.fp8_gemm(x_fp8.to(DEVICE), scale_a.to(DEVICE), weight.to(DEVICE), weight_scale.to(DEVICE),
                              None, torch.float32).cpu()
    torch.testing.assert_close(out, expected, rtol=0, atol=(1e-4 if DEVICE == "cuda" else 1e-5) * expected.abs().max().item())


@pytest.mark.parametrize("m,n", [(1, 64), (7, 1500), (130, 96)])
@pytest.mark.parametrize("dtype", [torch.float16, BF16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("static", [False, True], ids=["per-token", "static"])
def test_the_tensorwise_epilogue_scales_rows_and_columns_and_adds_the_bias(m, n, dtype, static):
    """The float32 product of a unit-scale _scaled_mm, times scale_a per row and scale_b per column, plus the
    bias, rounded once to the output dtype."""
    gen = torch.Generator().manual_seed(m + n)
    acc = torch.randn(m, n, generator=gen) * 1e4
    scale_a = torch.tensor([[0.02]]).expand(m, 1) if static else torch.rand(m, 1, generator=gen) + 0.01
    scale_b, bias = torch.rand(n, generator=gen) * 1e-3, torch.randn(n, generator=gen).to(dtype)
    for with_bias in (False, True):
        expected = acc * scale_a * scale_b.view(1, -1) + (bias.float() if with_bias else 0)
        out = triton_fp8.scale_rows_cols(acc.to(DEVICE), scale_a.to(DEVICE), scale_b.to(DEVICE),
                                         bias.to(DEVICE) if with_bias else None, dtype)
        assert out.dtype == dtype and out.shape == (m, n)
        torch.testing.assert_close(out.cpu().float(), expected.to(dtype).float(), rtol=0,
                                   atol=torch.finfo(dtype).eps * expected.abs().max().item())
    assert triton_fp8.scale_rows_cols(acc[:0].to(DEVICE), scale_a[:0].to(DEVICE), scale_b.to(DEVICE), None,
                                      dtype).shape == (0, n)
