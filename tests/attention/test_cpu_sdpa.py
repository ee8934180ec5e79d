"""The fast CPU attention path (cpu_sdpa.py) against the reference (torch_ref.py) on random paged batches."""
from __future__ import annotations

import pytest
import torch

from sluice.attention.backend import AttentionMetadata
from sluice.attention.cpu_sdpa import CpuSdpaBackend
from sluice.attention.torch_ref import TorchRefBackend


def random_batch(seed: int, num_reqs: int, block_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 max_context: int, chunk_share: float, dtype: torch.dtype, num_padding_tokens: int = 0):
    """A packed step of decodes and prompt chunks (some with a cached prefix) over scrambled blocks."""
    g = torch.Generator().manual_seed(seed)
    query_lens, seq_lens = [], []
    for _ in range(num_reqs):
        seq_len = int(torch.randint(1, max_context + 1, (), generator=g))
        is_chunk = float(torch.rand((), generator=g)) < chunk_share
        query_lens.append(int(torch.randint(1, seq_len + 1, (), generator=g)) if is_chunk else 1)
        seq_lens.append(seq_len)
    max_blocks = -(-max(seq_lens) // block_size) + 2
    num_blocks = num_reqs * max_blocks + 3
    order = torch.randperm(num_blocks, generator=g)
    block_table = order[:num_reqs * max_blocks].view(num_reqs, max_blocks).to(torch.int32)
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    qsl = [0]
    for n in query_lens:
        qsl.append(qsl[-1] + n)
    num_tokens = qsl[-1]
    query = torch.randn(num_tokens + num_padding_tokens, num_heads, head_dim, generator=g).to(dtype)
    metadata = AttentionMetadata(
        num_actual_tokens=num_tokens, num_reqs=num_reqs,
        query_start_loc=torch.tensor(qsl, dtype=torch.int32), seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_table=block_table, slot_mapping=torch.zeros(num_tokens, dtype=torch.int64),
        max_query_len=max(query_lens), max_seq_len=max(seq_lens), query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens)
    return query, kv_cache, metadata


SHAPES = [  # (num_reqs, block_size, heads, kv heads, head dim, max context, share of chunks)
    (1, 16, 4, 4, 32, 40, 0.0), (1, 16, 4, 2, 32, 40, 1.0), (7, 16, 8, 2, 64, 100, 0.0),
    (9, 8, 4, 1, 16, 70, 0.5), (16, 16, 6, 3, 32, 130, 0.3), (5, 32, 2, 2, 128, 90, 1.0),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sliding_window", [None, 1, 7, 33])
@pytest.mark.parametrize("soft_cap", [None, 5.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_fast_path_matches_reference_in_float32(shape, sliding_window, soft_cap, seed):
    num_reqs, block_size, heads, kv_heads, head_dim, max_context, chunk_share = shape
    query, kv_cache, metadata = random_batch(seed, num_reqs, block_size, heads, kv_heads, head_dim, max_context,
                                             chunk_share, torch.float32)
    ref = TorchRefBackend().forward(query, kv_cache, metadata, 0.3, sliding_window, soft_cap)
    fast = CpuSdpaBackend().forward(query, kv_cache, metadata, 0.3, sliding_window, soft_cap)
    torch.testing.assert_close(fast, ref, atol=2e-5, rtol=2e-5)


def test_plan_made_once_serves_layers_with_different_windows():
    query, kv_cache, metadata = random_batch(3, 12, 16, 4, 2, 32, 120, 0.4, torch.float32)
    backend = CpuSdpaBackend()
    metadata.plan = backend.plan(metadata, query.shape[0], 4, 2)
    for window, cap in ((None, None), (24, None), (None, 3.0), (24, 3.0), (None, None)):
        ref = TorchRefBackend().forward(query, kv_cache, metadata, 0.2, window, cap)
        torch.testing.assert_close(backend.forward(query, kv_cache, metadata, 0.2, window, cap), ref,
                                   atol=2e-5, rtol=2e-5)


def test_padding_tokens_after_the_step_are_left_zero():
    query, kv_cache, metadata = random_batch(4, 6, 16, 4, 2, 32, 50, 0.5, torch.float32, num_padding_tokens=3)
    fast = CpuSdpaBackend().forward(query, kv_cache, metadata, 0.2)
    ref = TorchRefBackend().forward(query[:metadata.num_actual_tokens], kv_cache, metadata, 0.2)
    torch.testing.assert_close(fast[:metadata.num_actual_tokens], ref, atol=2e-5, rtol=2e-5)
    assert not fast[metadata.num_actual_tokens:].any()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_path_matches_reference_in_bfloat16(seed):
    query, kv_cache, metadata = random_batch(seed, 20, 16, 8, 2, 64, 150, 0.3, torch.bfloat16)
    for window, cap in ((None, None), (40, None), (None, 30.0)):
        ref = TorchRefBackend().forward(query, kv_cache, metadata, 0.125, window, cap)
        fast = CpuSdpaBackend().forward(query, kv_cache, metadata, 0.125, window, cap)
        torch.testing.assert_close(fast.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_cpu_default_is_the_fast_path_and_the_reference_stays_selectable(monkeypatch):
    from sluice.attention import get_attention_backend
    monkeypatch.delenv("SLUICE_CPU_ATTENTION", raising=False)
    default = get_attention_backend("cpu")
    assert isinstance(default, CpuSdpaBackend) and default.native_decode
    monkeypatch.setenv("SLUICE_CPU_ATTENTION", "sdpa")
    assert not get_attention_backend("cpu").native_decode
    monkeypatch.setenv("SLUICE_CPU_ATTENTION", "reference")
    assert isinstance(get_attention_backend("cpu"), TorchRefBackend)
    monkeypatch.setenv("SLUICE_CPU_ATTENTION", "fast")
    with pytest.raises(ValueError, match="SLUICE_CPU_ATTENTION must be one of native, sdpa, reference"):
        get_attention_backend("cpu")
