"""Sliding-window and soft-capped Triton attention computes what the torch reference computes.

Each case poisons (NaN) every KV block that lies wholly before its request's first window, as the
KV cache manager may have recycled them: neither path may read them. Same interpreter notes as
test_triton_attention.py:

    TRITON_INTERPRET=1 python -m pytest -q tests/gpu/test_triton_window_softcap.py
"""
from __future__ import annotations

import pytest
import torch

from sluice.attention.torch_ref import TorchRefBackend
from tests.gpu.test_triton_attention import DEVICE, INTERPRET, TOLERANCE, Batch, make_batch, to_device

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE is None, reason="needs CUDA (or TRITON_INTERPRET=1 for the interpreter)")]


@pytest.fixture(scope="module")
def triton_paged():
    return pytest.importorskip("sluice.attention.triton_paged")


def poison_blocks_before_window(batch: Batch, query_lens: list[int], seq_lens: list[int], window: int) -> int:
    """NaN in every block a request's queries cannot see; returns how many blocks were poisoned."""
    block_size = batch.kv_cache.shape[2]
    poisoned = 0
    for i, (q_len, seq_len) in enumerate(zip(query_lens, seq_lens)):
        first_visible = max(0, seq_len - q_len - window + 1)
        for b in range(first_visible // block_size):
            batch.kv_cache[:, batch.metadata.block_table[i, b]] = float("nan")
            poisoned += 1
    return poisoned


def compare(backend, batch: Batch, window: int | None, soft_cap: float | None, scale: float = 0.3) -> None:
    dev = to_device(batch)
    out = torch.full_like(dev.query, float("nan"))
    backend.forward(dev.query, dev.kv_cache, dev.metadata, scale, out=out, sliding_window=window,
                    logits_soft_cap=soft_cap)
    ref = TorchRefBackend().forward(batch.query.float(), batch.kv_cache.float(), batch.metadata, scale,
                                    sliding_window=window, logits_soft_cap=soft_cap)
    got = out.float().cpu()
    assert not ref.isnan().any(), "the reference read a block before the window"
    assert not got.isnan().any(), "a row was never written, or the kernel read a block before the window"
    row_err = (got - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-6)
    assert row_err.max() < 20 * TOLERANCE[batch.query.dtype], f"worst row error {row_err.max():.2e}"
    assert (got - ref).norm() / ref.norm() < TOLERANCE[batch.query.dtype]


# (query_lens, seq_lens): chunks that start inside, at and past the window; decodes at every offset.
SHAPES = {
    "mixed": ([5, 1, 17, 1, 3, 30], [9, 40, 17, 70, 3, 95]),
    "decodes": ([1] * 7, [1, 7, 8, 9, 31, 64, 150]),
    "long_chunks": ([48, 64, 2], [48, 130, 200]),
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("window", [1, 8, 13, 32])
@pytest.mark.parametrize("group", [1, 4])
def test_sliding_window_matches_reference(triton_paged, shape, window, group):
    query_lens, seq_lens = SHAPES[shape]
    batch = make_batch(query_lens, seq_lens, 2 * group, 2, 64, 16, torch.float32, seed=window * 10 + group)
    poisoned = poison_blocks_before_window(batch, query_lens, seq_lens, window)
    assert poisoned > 0 or window == 32 and shape == "mixed"
    compare(triton_paged.TritonPagedBackend(), batch, window, None)


@pytest.mark.parametrize("soft_cap", [50.0, 2.0])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_soft_cap_matches_reference(triton_paged, shape, soft_cap):
    query_lens, seq_lens = SHAPES[shape]
    batch = make_batch(query_lens, seq_lens, 8, 2, 64, 16, torch.float16, seed=3)
    compare(triton_paged.TritonPagedBackend(), batch, None, soft_cap, scale=1.0)


def test_soft_cap_changes_the_result(triton_paged):
    """A cap well below the scores' range must matter (else the test above proves nothing)."""
    query_lens, seq_lens = SHAPES["mixed"]
    batch = make_batch(query_lens, seq_lens, 4, 2, 64, 16, torch.float32, seed=4)
    capped = TorchRefBackend().forward(batch.query, batch.kv_cache, batch.metadata, 1.0, logits_soft_cap=2.0)
    plain = TorchRefBackend().forward(batch.query, batch.kv_cache, batch.metadata, 1.0)
    assert (capped - plain).abs().max() > 0.1


@pytest.mark.parametrize("window", [16, 100])
def test_window_and_soft_cap_together_with_split_kv(triton_paged, window):
    """Gemma 2's sliding layers: both options, decodes split over KV (flash-decoding) and a long chunk."""
    seq_lens = [700, 1500, 300] if INTERPRET else [4100, 9000, 130, 20000]
    query_lens = [1] * len(seq_lens)
    batch = make_batch(query_lens, seq_lens, 8, 2, 64, 16, torch.bfloat16, seed=window)
    poison_blocks_before_window(batch, query_lens, seq_lens, window)
    compare(triton_paged.TritonPagedBackend(), batch, window, 30.0)
    mixed = make_batch([1, 1, 200], [700, 40, 900], 8, 2, 64, 16, torch.bfloat16, seed=window + 1)
    poison_blocks_before_window(mixed, [1, 1, 200], [700, 40, 900], window)
    compare(triton_paged.TritonPagedBackend(mixed_split_min_seq_len=256), mixed, window, 30.0)


@pytest.mark.parametrize("head_dim,block_size", [(128, 16), (256, 32)])
def test_gemma_head_dims(triton_paged, head_dim, block_size):
    """Gemma 2/3 use head_dim 256 (and 128); GQA 2."""
    query_lens, seq_lens = SHAPES["mixed"]
    batch = make_batch(query_lens, seq_lens, 4, 2, head_dim, block_size, torch.bfloat16, seed=head_dim)
    poison_blocks_before_window(batch, query_lens, seq_lens, 24)
    compare(triton_paged.TritonPagedBackend(), batch, 24, 50.0, scale=head_dim ** -0.5)
