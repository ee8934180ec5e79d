"""Triton attention over an fp8 KV cache computes what the torch reference computes over the same cache.

Both read the same float8 values: the reference dequantizes them in float32, the kernel folds the
scales into its math, so the tolerances are those of the query dtype (test_triton_attention.py).
Runs on CUDA (sm 8.9+); for development without a GPU, under the Triton interpreter:

    TRITON_INTERPRET=1 python -m pytest -q tests/gpu/test_triton_fp8_kv.py
"""
from __future__ import annotations

import pytest
import torch

from sluice.attention.kv_quant import FP8_KV_DTYPE, FP8_MAX, quantize_fp8
from sluice.attention.torch_ref import TorchRefBackend
from tests.gpu.test_triton_attention import DEVICE, INTERPRET, MIXED, TOLERANCE, Batch, make_batch, to_device

needs_fp8 = pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
                               reason="float8 needs compute capability 8.9+")
pytestmark = [pytest.mark.gpu, needs_fp8,
              pytest.mark.skipif(DEVICE is None, reason="needs CUDA (or TRITON_INTERPRET=1 for the interpreter)")]


@pytest.fixture(scope="module")
def triton_paged():
    return pytest.importorskip("sluice.attention.triton_paged")


def to_fp8(batch: Batch, k_amax: float = 3.0, v_amax: float = 0.5) -> tuple[Batch, torch.Tensor]:
    """The batch with its cache quantized to float8: keys and values of different magnitudes, so a swapped or
    missing scale shows."""
    kv = batch.kv_cache.float()
    kv[0] *= k_amax / kv[0].abs().amax()
    kv[1] *= v_amax / kv[1].abs().amax()
    scales = torch.tensor([k_amax / FP8_MAX, v_amax / FP8_MAX])
    cache = torch.empty(kv.shape, dtype=FP8_KV_DTYPE)
    cache[0], cache[1] = quantize_fp8(kv[0], scales[0]), quantize_fp8(kv[1], scales[1])
    return Batch(batch.query, cache, batch.metadata), scales


def compare(backend, batch: Batch, scales: torch.Tensor, window: int | None = None, soft_cap: float | None = None,
            scale: float | None = None) -> None:
    scale = scale if scale is not None else batch.query.shape[-1] ** -0.5
    dev = to_device(batch)
    out = torch.full_like(dev.query, float("nan"))
    backend.forward(dev.query, dev.kv_cache, dev.metadata, scale, out=out, sliding_window=window,
                    logits_soft_cap=soft_cap, kv_scales=scales.to(DEVICE))
    ref = TorchRefBackend().forward(batch.query.float(), batch.kv_cache, batch.metadata, scale,
                                    sliding_window=window, logits_soft_cap=soft_cap, kv_scales=scales)
    got = out.float().cpu()
    assert not got.isnan().any(), "some output rows were never written"
    tolerance = TOLERANCE[batch.query.dtype]
    assert (got - ref).norm() / ref.norm() < tolerance
    row_err = (got - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-6)
    assert row_err.max() < 20 * tolerance, f"worst row error {row_err.max():.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group,head_dim,block_size", [(1, 64, 16), (4, 64, 32), (8, 128, 16)])
def test_mixed_batch_over_fp8_cache_matches_reference(triton_paged, dtype, group, head_dim, block_size):
    """Prompt chunks (the large row tile) and decodes (the decode tile) in one step."""
    batch, scales = to_fp8(make_batch(*MIXED, 2 * group, 2, head_dim, block_size, dtype, seed=group + head_dim))
    compare(triton_paged.TritonPagedBackend(), batch, scales)


def test_decode_only_batch_with_split_kv_over_fp8_cache(triton_paged):
    seq_lens = [700, 1500] if INTERPRET else [4100, 9000, 130]
    batch, scales = to_fp8(make_batch([1] * len(seq_lens), seq_lens, 4, 1, 64, 16, torch.float16, seed=21))
    backend = triton_paged.TritonPagedBackend()
    assert backend.plan(batch.metadata, len(seq_lens), 4, 1).num_splits > 1
    compare(backend, batch, scales)


def test_long_context_chunk_with_split_kv_over_fp8_cache(triton_paged):
    backend = triton_paged.TritonPagedBackend(mixed_split_min_seq_len=256)
    batch, scales = to_fp8(make_batch([24, 1, 9], [1100, 900, 9], 8, 2, 64, 16, torch.float16, seed=42))
    assert backend.plan(batch.metadata, 34, 8, 2).num_splits > 1
    compare(backend, batch, scales)


@pytest.mark.parametrize("window,soft_cap", [(13, None), (None, 5.0), (16, 50.0)])
def test_window_and_soft_cap_over_fp8_cache(triton_paged, window, soft_cap):
    batch, scales = to_fp8(make_batch([5, 1, 17, 1, 30], [9, 40, 17, 70, 95], 8, 2, 64, 16, torch.float16, seed=3))
    compare(triton_paged.TritonPagedBackend(), batch, scales, window=window, soft_cap=soft_cap, scale=0.3)


@pytest.mark.parametrize("src_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_write_kv_stores_the_same_fp8_bytes_as_the_reference(triton_paged, src_dtype):
    """x / scale, saturated at 448 and rounded to nearest even: bit for bit, tiny (subnormal) and huge values
    included."""
    if INTERPRET and src_dtype == torch.bfloat16:
        src_dtype = torch.float16  # the interpreter's bf16 arithmetic truncates; compiled code does not
    gen = torch.Generator().manual_seed(1)
    num_blocks, block_size, num_kv_heads, head_dim, num_tokens = 6, 16, 2, 64, 24
    key = (torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
           * torch.logspace(-4, 2, num_tokens).view(-1, 1, 1)).to(src_dtype)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(src_dtype)
    key[0, 0, :4] = torch.tensor([1e4, -1e4, 0.0, -0.0]).to(src_dtype)  # saturated, and signed zeros
    scales = torch.tensor([0.05, 0.003])
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[[3, 11]] = -1  # padding tokens under CUDA graphs: nothing written
    cache = torch.zeros(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=FP8_KV_DTYPE)
    expected = cache.clone()
    keep = slots >= 0
    TorchRefBackend().write_kv(key[keep], value[keep], expected, slots[keep], kv_scales=scales)

    dev_cache = cache.to(DEVICE)
    triton_paged.TritonPagedBackend().write_kv(key.to(DEVICE), value.to(DEVICE), dev_cache, slots.to(DEVICE),
                                               kv_scales=scales.to(DEVICE))
    assert torch.equal(dev_cache.cpu().view(torch.uint8), expected.view(torch.uint8))


def test_write_then_attend_round_trip_through_fp8(triton_paged):
    """The kernels' write and read agree: a decode token's K/V written through the kernel and read back."""
    batch, scales = to_fp8(make_batch([1, 1], [16, 33], 4, 2, 64, 16, torch.float16, seed=4))
    m = batch.metadata
    last_slots = torch.tensor([int(m.block_table[i, (s - 1) // 16]) * 16 + (s - 1) % 16
                               for i, s in enumerate(m.seq_lens_cpu)])
    key, value = torch.randn(2, 2, 64).half(), torch.randn(2, 2, 64).half() * 0.2
    dev = to_device(batch)
    TorchRefBackend().write_kv(key, value, batch.kv_cache, last_slots, kv_scales=scales)
    triton_paged.TritonPagedBackend().write_kv(key.to(DEVICE), value.to(DEVICE), dev.kv_cache,
                                               last_slots.to(DEVICE), kv_scales=scales.to(DEVICE))
    assert torch.equal(dev.kv_cache.cpu().view(torch.uint8), batch.kv_cache.view(torch.uint8))
    compare(triton_paged.TritonPagedBackend(), batch, scales)


def test_fp8_cache_without_scales_is_refused(triton_paged):
    batch, _ = to_fp8(make_batch([1], [4], 4, 2, 64, 16, torch.float16))
    dev = to_device(batch)
    with pytest.raises(ValueError, match="kv_scales"):
        triton_paged.TritonPagedBackend().forward(dev.query, dev.kv_cache, dev.metadata, 0.125)
