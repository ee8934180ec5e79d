"""Quantized linear layers on CUDA compute what the CPU reference path computes.

The checkpoints are the ones tests/quantization/ writes (fp8 per-tensor and block-wise, compressed-tensors fp8,
AWQ, GPTQ with act-order, compressed-tensors W4A16); each linear layer of the CUDA model is compared with the
float32 CPU model's layer on the same inputs. Skipped without CUDA (fp8 W8A8 also needs compute capability 8.9+).
"""
from __future__ import annotations

import pytest
import torch

from sluice.attention import get_attention_backend
from sluice.layers.linear import LinearBase
from sluice.models.loader import build_model, iterate_safetensors, load_hf_config
from tests.quantization import checkpoints as ckpt
from tests.quantization.test_quantized_checkpoints import FORMATS, W8A8
from tests.tiny_models import save_tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _build(folder, dtype, device):
    return build_model(load_hf_config(folder), dtype, device, get_attention_backend(device),
                       weights=iterate_safetensors(folder))


@pytest.mark.parametrize("num_tokens", [1, 7, 64, 300])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_cuda_layers_match_the_cpu_reference(fmt, num_tokens, tmp_path):
    if fmt in W8A8 and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 W8A8 needs compute capability 8.9+")
    if fmt.startswith("ct_"):
        pytest.importorskip("compressed_tensors")
    quantizer, config, ignore = FORMATS[fmt]
    src = save_tiny_model(tmp_path / "src", "llama", tokenizer=False)
    ckpt.write_quantized(src, tmp_path / "q", quantizer, config, ignore)
    reference = dict(_build(tmp_path / "q", torch.float32, "cpu").named_modules())
    model = _build(tmp_path / "q", torch.bfloat16, "cuda")
    for name, layer in model.named_modules():
        if not isinstance(layer, LinearBase):
            continue
        x = torch.randn(num_tokens, layer.input_size, generator=torch.Generator().manual_seed(num_tokens))
        expected = reference[name](x)
        out = layer(x.to("cuda", torch.bfloat16)).float().cpu()
        # bfloat16 inputs and outputs (and, for W8A8, bfloat16-rounded activation scales) against float32
        torch.testing.assert_close(out, expected, rtol=3e-2, atol=3e-2 * expected.abs().max().item())


@pytest.mark.parametrize("num_tokens", [1, 16, 300])
def test_cuda_rtn_layers_match_the_cpu_reference(num_tokens, tmp_path):
    """--quantization rtn: the CUDA layers run the W4A16 Triton GEMM on the codes the CPU dequantizes at load
    (both quantize the same bfloat16 weights)."""
    src = save_tiny_model(tmp_path / "src", "llama", tokenizer=False)

    def build(device):
        return build_model(load_hf_config(src), torch.bfloat16, device, get_attention_backend(device),
                           weights=iterate_safetensors(src), quantization="rtn")
    reference = dict(build("cpu").named_modules())
    for name, layer in build("cuda").named_modules():
        if not isinstance(layer, LinearBase):
            continue
        assert layer.linear_method.mode == "triton", name
        x = torch.randn(num_tokens, layer.input_size, generator=torch.Generator().manual_seed(num_tokens))
        expected = x.bfloat16().float() @ reference[name].weight.float().t()
        out = layer(x.to("cuda", torch.bfloat16)).float().cpu()
        torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


def test_load_time_quantizers_give_the_same_codes_and_scales_on_cuda_and_cpu():
    """RTN codes and fp8 per-row scales are computed where the weights live: CUDA must agree with the CPU bit for
    bit (a quotient by a Python number is a multiply by its reciprocal on CUDA, an ulp away at times, which flips
    codes at rounding boundaries)."""
    from sluice.layers.quantization.fp8 import quantize_fp8_per_row
    from sluice.layers.quantization.w4a16 import quantize_rtn

    weight = torch.randn(512, 384, generator=torch.Generator().manual_seed(0)).bfloat16()
    for group_size in (128, -1):
        cpu, gpu = quantize_rtn(weight, 4, group_size), quantize_rtn(weight.cuda(), 4, group_size)
        for name in ("codes", "zeros", "scales"):
            assert torch.equal(cpu[name], gpu[name].cpu()), (group_size, name)
    q_cpu, s_cpu = quantize_fp8_per_row(weight.float())
    q_gpu, s_gpu = quantize_fp8_per_row(weight.float().cuda())
    assert torch.equal(s_cpu, s_gpu.cpu())
    assert torch.equal(q_cpu.view(torch.uint8), q_gpu.cpu().view(torch.uint8))
