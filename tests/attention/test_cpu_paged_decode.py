"""The native paged decode kernel (cpu_kernel.py, csrc/paged_decode.c) against the reference (torch_ref.py)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from sluice.attention import cpu_kernel
from sluice.attention.cpu_sdpa import CpuSdpaBackend
from sluice.attention.kv_quant import FP8_KV_DTYPE
from sluice.attention.torch_ref import TorchRefBackend
from tests.attention.test_cpu_sdpa import random_batch
from tests.attention.test_fp8_kv_cache import fp8_batch

# measured worst cases over these batches: float32 ~2e-6, float16 one ulp, bfloat16 one ulp (0.0078 near 1)
TOLERANCES = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (1.6e-2, 1.6e-2), torch.float16: (2e-3, 2e-3)}


@pytest.fixture(scope="module")
def kernel():
    if shutil.which(cpu_kernel.COMPILER) is None:
        pytest.skip(f"no C compiler ({cpu_kernel.COMPILER!r}) to build the paged decode kernel")
    fn = cpu_kernel.load_paged_decode()
    assert fn is not None, "a compiler is present, so the kernel must build"
    return fn


def native_forward(query, kv_cache, metadata, scale, window=None, cap=None, kv_scales=None, backend=None):
    backend = backend or CpuSdpaBackend()
    metadata.plan = backend.plan(metadata, query.shape[0], query.shape[1], kv_cache.shape[3])
    assert metadata.plan.native_decodes is not None, "the decodes must run in the native kernel"
    return backend.forward(query, kv_cache, metadata, scale, window, cap, kv_scales)


def assert_matches_reference(query, kv_cache, metadata, scale, window, cap, kv_scales=None):
    ref = TorchRefBackend().forward(query, kv_cache, metadata, scale, window, cap, kv_scales)
    got = native_forward(query, kv_cache, metadata, scale, window, cap, kv_scales)
    atol, rtol = TOLERANCES[query.dtype]
    torch.testing.assert_close(got, ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128, 256, 40])
@pytest.mark.parametrize("gqa", [1, 2, 4, 8])
@pytest.mark.parametrize("block_size", [16, 32])
def test_decodes_match_reference_over_shuffled_blocks(kernel, dtype, head_dim, gqa, block_size):
    seed = head_dim + 7 * gqa + block_size
    query, kv_cache, metadata = random_batch(seed, 12, block_size, 2 * gqa, 2, head_dim, 300, 0.0, dtype)
    for window, cap in ((None, None), (45, None), (None, 20.0), (block_size, 4.0)):
        assert_matches_reference(query, kv_cache, metadata, head_dim ** -0.5, window, cap)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_request_over_long_contexts_splits_its_blocks(kernel, seed, dtype):
    """Batch 1 (few kv heads for the threads) cuts the context into splits merged at the end."""
    for heads, kv_heads in ((4, 2), (9, 3), (8, 1)):
        query, kv_cache, metadata = random_batch(seed, 1, 16, heads, kv_heads, 64, 2000, 0.0, dtype)
        for window, cap in ((None, None), (700, None), (None, 30.0)):
            assert_matches_reference(query, kv_cache, metadata, 0.125, window, cap)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_three_hundred_requests(kernel, dtype):
    query, kv_cache, metadata = random_batch(11, 300, 16, 4, 2, 64, 400, 0.0, dtype)
    assert_matches_reference(query, kv_cache, metadata, 0.125, None, None)
    assert_matches_reference(query, kv_cache, metadata, 0.125, 100, 50.0)


@pytest.mark.parametrize("shape", [(9, 16, 4, 2, 64, 300, 0.0), (1, 32, 8, 1, 128, 1500, 0.0),
                                   (10, 16, 6, 3, 64, 200, 0.4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_cache_with_scales(kernel, shape, dtype):
    query, cache, metadata, scales, _ = fp8_batch(5, shape, dtype)
    assert cache.dtype == FP8_KV_DTYPE
    for window, cap in ((None, None), (50, 10.0)):
        assert_matches_reference(query, cache, metadata, 0.125, window, cap, scales)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_steps_put_decodes_in_the_kernel_and_chunks_on_sdpa(kernel, seed, dtype):
    query, kv_cache, metadata = random_batch(seed, 14, 16, 8, 2, 64, 200, 0.4, dtype, num_padding_tokens=3)
    n = metadata.num_actual_tokens
    ref = TorchRefBackend().forward(query[:n], kv_cache, metadata, 0.125, 60, None)
    got = native_forward(query, kv_cache, metadata, 0.125, 60, None)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(got[:n], ref, atol=atol, rtol=rtol)
    assert not got[n:].any()


def test_a_query_view_with_token_stride_is_read_in_place(kernel):
    query, kv_cache, metadata = random_batch(2, 10, 16, 4, 2, 64, 150, 0.0, torch.float32)
    fused = torch.cat([query.flatten(1), torch.randn(query.shape[0], 128)], dim=1)  # [T, (H + 2) * D] like qkv
    view = fused[:, :4 * 64].view(-1, 4, 64)
    assert not view.is_contiguous()
    torch.testing.assert_close(native_forward(view, kv_cache, metadata, 0.125),
                               TorchRefBackend().forward(query, kv_cache, metadata, 0.125), atol=2e-5, rtol=2e-5)


def test_without_a_compiler_decodes_fall_back_to_sdpa_with_the_same_answers(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("SLUICE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "COMPILER", "no-such-c-compiler")
    monkeypatch.setattr(cpu_kernel, "_loaded", {})
    query, kv_cache, metadata = random_batch(4, 20, 16, 8, 2, 64, 200, 0.3, torch.float32)
    backend = CpuSdpaBackend()
    with caplog.at_level("INFO", logger="sluice.attention.cpu_kernel"):
        metadata.plan = backend.plan(metadata, query.shape[0], 8, 2)
    assert metadata.plan.native_decodes is None
    assert sum("decodes use SDPA" in r.getMessage() for r in caplog.records) == 1
    assert not list(tmp_path.rglob("*.so"))
    torch.testing.assert_close(backend.forward(query, kv_cache, metadata, 0.125, 33, 5.0),
                               TorchRefBackend().forward(query, kv_cache, metadata, 0.125, 33, 5.0),
                               atol=2e-5, rtol=2e-5)


def test_forcing_sdpa_keeps_decodes_off_the_kernel():
    query, kv_cache, metadata = random_batch(1, 6, 16, 4, 2, 64, 100, 0.0, torch.float32)
    assert CpuSdpaBackend(native_decode=False).plan(metadata, query.shape[0], 4, 2).native_decodes is None


def test_the_built_library_is_cached_and_reused(kernel, monkeypatch, tmp_path):
    monkeypatch.setenv("SLUICE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "_loaded", {})
    assert cpu_kernel.load_paged_decode() is not None
    built = list((tmp_path / "cpu_kernels").iterdir())
    assert len(built) == 1 and built[0] == cpu_kernel.library_path(cpu_kernel.COMPILER)  # no temporary left

    def no_build(*args):
        raise AssertionError("a cached library must not be built again")
    monkeypatch.setattr(cpu_kernel, "_build", no_build)
    monkeypatch.setattr(cpu_kernel, "_loaded", {})
    assert cpu_kernel.load_paged_decode() is not None


def test_the_kernel_shares_torchs_openmp_runtime(kernel):
    """A fresh process (other libraries of a test session may bring their own): torch, then the kernel."""
    script = ("import json, torch; from sluice.attention import cpu_kernel; assert cpu_kernel.load_paged_decode(); "
              "print(json.dumps(sorted({l.split()[-1] for l in open('/proc/self/maps') if 'libgomp' in l})))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    runtimes = json.loads(result.stdout)
    assert len(runtimes) == 1, runtimes
