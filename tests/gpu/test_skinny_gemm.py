"""The skinny matmul kernel computes F.linear for the few-row products of small decode steps.

Runs on CUDA; skipped without it. Without a GPU, run it under the Triton interpreter:

    TRITON_INTERPRET=1 python -m pytest -q tests/gpu/test_skinny_gemm.py

Under the interpreter bfloat16 is skipped (its float32 -> bfloat16 cast truncates), and the L8
shapes are left to CUDA.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if INTERPRET else None)
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE is None, reason="needs CUDA (or TRITON_INTERPRET=1 for the interpreter)")]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

skinny_gemm = pytest.importorskip("sluice.layers.skinny_gemm")

DTYPES = [pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.skipif(INTERPRET, reason="interpreter bf16")),
          pytest.param(torch.float16, id="fp16")]


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear in float32, rounded once to the input dtype."""
    out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return out.to(x.dtype)


def assert_close_to_reference(actual: torch.Tensor, x, weight, bias) -> None:
    expected = reference(x, weight, bias)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    # One rounding of a float32 sum: within one ulp of the output, relative to its magnitude.
    tolerance = 2 * torch.finfo(x.dtype).eps * expected.float().abs().clamp_min(1.0)
    assert ((actual.float() - expected.float()).abs() <= tolerance).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_rows", [1, 3, 8, 16])
@pytest.mark.parametrize("n,k", [(96, 128), (200, 256), (64, 320)])
def test_matches_linear_for_ragged_shapes(dtype, num_rows, n, k):
    generator = torch.Generator().manual_seed(num_rows * 1000 + n + k)
    x = torch.randn(num_rows, k, generator=generator).to(DEVICE, dtype)
    weight = (torch.randn(n, k, generator=generator) / k ** 0.5).to(DEVICE, dtype)
    assert skinny_gemm.can_serve(x, weight) == x.is_cuda  # the interpreter runs it on CPU tensors
    assert_close_to_reference(skinny_gemm.skinny_linear(x, weight), x, weight, None)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_and_leading_dims(dtype):
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 128, generator=generator).to(DEVICE, dtype)
    weight = torch.randn(80, 128, generator=generator).to(DEVICE, dtype) / 16
    bias = torch.randn(80, generator=generator).to(DEVICE, dtype)
    out = skinny_gemm.skinny_linear(x, weight, bias)
    assert out.shape == (2, 3, 80)
    assert_close_to_reference(out.reshape(6, 80), x.reshape(6, 128), weight, bias)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_rows_of_x(dtype):
    """x as a column slice of a wider tensor (rows strided), as the fused qkv output hands it on."""
    generator = torch.Generator().manual_seed(11)
    wide = torch.randn(5, 384, generator=generator).to(DEVICE, dtype)
    x = wide[:, 64:320]
    weight = torch.randn(48, 256, generator=generator).to(DEVICE, dtype) / 16
    assert_close_to_reference(skinny_gemm.skinny_linear(x, weight), x, weight, None)


def test_declines_what_it_does_not_serve():
    weight = torch.zeros(64, 128, dtype=torch.float16)
    cpu_rows = torch.zeros(4, 128, dtype=torch.float16)
    assert not skinny_gemm.can_serve(cpu_rows, weight)  # CPU tensors keep F.linear
    if torch.cuda.is_available():
        weight = weight.cuda()
        assert skinny_gemm.can_serve(cpu_rows.cuda(), weight)
        assert not skinny_gemm.can_serve(torch.zeros(17, 128, dtype=torch.float16, device="cuda"), weight)
        assert not skinny_gemm.can_serve(torch.zeros(4, 128, device="cuda"), weight.float())  # float32
        assert not skinny_gemm.can_serve(torch.zeros(4, 96, dtype=torch.float16, device="cuda"),
                                         torch.zeros(64, 96, dtype=torch.float16, device="cuda"))  # K % 64
        assert not skinny_gemm.can_serve(cpu_rows.cuda(), weight.t().contiguous().t())  # strided weight


def test_config_covers_every_sm_for_narrow_outputs():
    """N = 4096 (L8's o_proj and down_proj) must still give at least one program per H100 SM."""
    config = skinny_gemm.choose_config(4, 4096, 14336)
    assert 4096 // config.block_n >= 128 and 14336 % config.block_k == 0 and config.block_m >= 4


@needs_cuda
@pytest.mark.parametrize("num_rows", [1, 4, 16])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)])
def test_l8_shapes_bf16(num_rows, n, k):
    generator = torch.Generator().manual_seed(n + num_rows)
    x = torch.randn(num_rows, k, generator=generator).to("cuda", torch.bfloat16)
    weight = (torch.randn(n, k, generator=generator) / k ** 0.5).to("cuda", torch.bfloat16)
    assert_close_to_reference(skinny_gemm.skinny_linear(x, weight), x, weight, None)
