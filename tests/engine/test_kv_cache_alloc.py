"""The CPU KV cache is zeros from calloc: zero everywhere, writable, in every cache dtype, and resident only
where it has been written (a start-up that sizes 1 GiB of cache does not write 1 GiB)."""
from __future__ import annotations

import pytest
import torch

from sluice.worker.kv_cache import KVCacheSpec, allocate_kv_caches, zeros

CPU = torch.device("cpu")


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_caches_are_zero_writable_and_of_the_spec(dtype):
    spec = KVCacheSpec(num_layers=3, num_kv_heads=2, head_dim=8, block_size=4, dtype=dtype)
    caches = allocate_kv_caches(spec, 5, CPU)
    assert len(caches) == 3 and len({c.data_ptr() for c in caches}) == 3
    for cache in caches:
        assert cache.shape == (2, 5, 4, 2, 8) and cache.dtype == dtype and cache.is_contiguous()
        assert bool((cache.float() == 0).all())
    caches[1][0, 2, 1] = 1.5
    assert float(caches[1][0, 2, 1, 0, 0]) == 1.5 and float(caches[0].float().abs().sum()) == 0.0


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_untouched_cache_is_not_resident():
    before = resident_bytes()
    cache = zeros((2, 4096, 16, 8, 256), torch.bfloat16, CPU)  # 512 MiB
    assert cache.untyped_storage().nbytes() == 512 << 20
    assert resident_bytes() - before < 64 << 20
    cache[0, :16].fill_(1.0)  # 16 blocks written: only those pages come in
    assert resident_bytes() - before < 96 << 20
    assert float(cache[1, -1].float().sum()) == 0.0
