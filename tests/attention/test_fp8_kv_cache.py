"""An fp8 KV cache on the CPU paths: what is stored, what is read back, and the fast path against the reference."""
from __future__ import annotations

import pytest
import torch

from sluice.attention.cpu_sdpa import CpuSdpaBackend
from sluice.attention.kv_quant import (FP8_KV_DTYPE, FP8_MAX, calculated_kv_scales, quantize_fp8,
                                       resolve_kv_cache_dtype)
from sluice.attention.torch_ref import TorchRefBackend
from tests.attention.test_cpu_sdpa import SHAPES, random_batch


def fp8_batch(seed: int, shape: tuple, dtype: torch.dtype = torch.float32, k_amax: float = 6.0, v_amax: float = 0.8):
    """random_batch with its cache in float8: keys and values of different magnitudes, so a swapped scale shows."""
    query, kv_cache, metadata = random_batch(seed, *shape, dtype)
    kv = kv_cache.float()
    kv[0] *= k_amax / kv[0].abs().amax()
    kv[1] *= v_amax / kv[1].abs().amax()
    scales = torch.tensor([k_amax, v_amax]) / FP8_MAX
    cache = torch.empty(kv.shape, dtype=FP8_KV_DTYPE)
    cache[0], cache[1] = quantize_fp8(kv[0], scales[0]), quantize_fp8(kv[1], scales[1])
    return query, cache, metadata, scales, kv


def test_kv_cache_dtype_flag_resolves_to_float8_e4m3fn_or_the_model_dtype():
    assert resolve_kv_cache_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert resolve_kv_cache_dtype("fp8", torch.bfloat16) == torch.float8_e4m3fn
    assert resolve_kv_cache_dtype("fp8_e4m3", torch.float32) == torch.float8_e4m3fn
    with pytest.raises(ValueError, match="fp8_e5m2"):
        resolve_kv_cache_dtype("fp8_e5m2", torch.bfloat16)


def test_write_stores_x_over_scale_saturated_and_read_multiplies_it_back():
    cache = torch.zeros(2, 2, 4, 1, 4, dtype=FP8_KV_DTYPE)
    key = torch.tensor([[[1.0, -3.0, 0.26, 1000.0]]])  # 1000 / 0.5 saturates at 448
    value = torch.tensor([[[0.1, 0.2, -0.4, 0.0]]])
    scales = torch.tensor([0.5, 0.001])
    TorchRefBackend().write_kv(key, value, cache, torch.tensor([5]), kv_scales=scales)
    stored_k, stored_v = cache[0, 1, 1, 0].float(), cache[1, 1, 1, 0].float()
    assert stored_k.tolist() == [2.0, -6.0, 0.5, 448.0]  # 0.52 rounds to 0.5 in float8_e4m3fn
    assert torch.allclose(stored_v * 0.001, value[0, 0], rtol=1 / 16)  # 3 mantissa bits: within half an ulp
    assert cache.float().abs().sum() == stored_k.abs().sum() + stored_v.abs().sum()  # nothing else written


def test_fp8_cache_without_scales_is_refused():
    query, cache, metadata, _, _ = fp8_batch(0, SHAPES[0])
    for backend in (TorchRefBackend(), CpuSdpaBackend()):
        with pytest.raises(ValueError, match="kv_scales"):
            backend.forward(query, cache, metadata, 0.2)


def test_reference_reads_the_dequantized_values():
    """The reference over the fp8 cache equals the reference over float(cache) * scale in the model dtype."""
    query, cache, metadata, scales, _ = fp8_batch(3, SHAPES[2])
    dequantized = torch.stack([cache[0].float() * scales[0], cache[1].float() * scales[1]])
    expected = TorchRefBackend().forward(query, dequantized, metadata, 0.2)
    got = TorchRefBackend().forward(query, cache, metadata, 0.2, kv_scales=scales)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_fp8_attention_stays_close_to_attention_over_the_unquantized_values():
    """The quantization error itself: 3 mantissa bits on K and V move the outputs by a few percent (0.05 here,
    with scores up to about 20)."""
    query, cache, metadata, scales, exact = fp8_batch(4, SHAPES[2])
    reference = TorchRefBackend().forward(query, exact, metadata, 0.2)
    got = TorchRefBackend().forward(query, cache, metadata, 0.2, kv_scales=scales)
    assert (got - reference).norm() / reference.norm() < 0.08


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sliding_window,soft_cap", [(None, None), (7, None), (None, 5.0), (33, 5.0)])
def test_fast_path_matches_reference_over_fp8_cache(shape, sliding_window, soft_cap):
    query, cache, metadata, scales, _ = fp8_batch(1, shape)
    ref = TorchRefBackend().forward(query, cache, metadata, 0.2, sliding_window, soft_cap, kv_scales=scales)
    fast = CpuSdpaBackend().forward(query, cache, metadata, 0.2, sliding_window, soft_cap, kv_scales=scales)
    torch.testing.assert_close(fast, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_fast_path_matches_reference_over_fp8_cache_in_bfloat16(seed):
    query, cache, metadata, scales, _ = fp8_batch(seed, (20, 16, 8, 2, 64, 150, 0.3), torch.bfloat16)
    for window, cap in ((None, None), (40, None), (None, 30.0)):
        ref = TorchRefBackend().forward(query, cache, metadata, 0.125, window, cap, kv_scales=scales)
        fast = CpuSdpaBackend().forward(query, cache, metadata, 0.125, window, cap, kv_scales=scales)
        torch.testing.assert_close(fast.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_both_paths_write_the_same_bytes():
    key, value = torch.randn(9, 2, 16), torch.randn(9, 2, 16) * 0.1
    slots = torch.tensor([0, 3, 4, 9, 17, 22, 30, 31, 12])
    scales = calculated_kv_scales(key, value)
    caches = [torch.zeros(2, 4, 8, 2, 16, dtype=FP8_KV_DTYPE) for _ in range(2)]
    TorchRefBackend().write_kv(key, value, caches[0], slots, kv_scales=scales)
    CpuSdpaBackend().write_kv(key, value, caches[1], slots, kv_scales=scales)
    assert torch.equal(caches[0].view(torch.uint8), caches[1].view(torch.uint8))


def test_calculated_scales_are_amax_over_448():
    key = torch.tensor([[[0.5, -8.96]]])
    value = torch.tensor([[[0.0, 0.224]]])
    assert calculated_kv_scales(key, value).tolist() == pytest.approx([8.96 / 448, 0.224 / 448])
    assert calculated_kv_scales(torch.zeros(2), torch.zeros(2)).min() > 0  # no division by zero later
