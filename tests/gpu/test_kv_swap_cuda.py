"""The CUDA copy path of swap preemption and the host prefix tier (worker/kv_swap.py): pinned host blocks; copies
on their own stream, a swap-out after the compute stream's queued work, a swap-in's transfer alongside it (only
its scatter into the cache waits), both before the next forward; the engine with forced swap preemption and a
host tier gives the CPU oracle's greedy tokens (float32). Skipped without CUDA."""
from __future__ import annotations

import pytest
import torch

from sluice import LLM, SamplingParams
from sluice.core.kv_offload import KVTransfers
from sluice.worker.kv_cache import KVCacheSpec, allocate_kv_caches
from sluice.worker.kv_swap import KVSwapper, measure_preemption_costs
from tests.engine.test_hf_equivalence import _prompts
from tests.tiny_models import hf_greedy, save_tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SPEC = KVCacheSpec(num_layers=3, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.bfloat16)


def _swapper(num_device_blocks: int = 32, num_host_blocks: int = 16) -> KVSwapper:
    device = torch.device("cuda")
    kv_caches = allocate_kv_caches(SPEC, num_device_blocks, device)
    for kv in kv_caches:
        kv.normal_()
    return KVSwapper(SPEC, num_host_blocks, kv_caches, device)


def test_host_blocks_are_pinned_and_copies_use_their_own_stream():
    swapper = _swapper()
    assert swapper.host_kv.is_pinned()
    assert swapper.copy_stream is not None and swapper.copy_stream != torch.cuda.current_stream()


def test_blocks_round_trip_through_host_memory():
    swapper = _swapper()
    originals = [kv[:, [3, 7, 11]].clone() for kv in swapper.kv_caches]
    swapper.run(KVTransfers(device_to_host=[(3, 0), (7, 5), (11, 2)]))
    for kv in swapper.kv_caches:
        kv[:, [3, 7, 11]] = 0  # the compute stream reuses the blocks after the copies (it waits for them)
    swapper.run(KVTransfers(host_to_device=[(0, 20), (5, 21), (2, 22)]))
    torch.cuda.synchronize()
    for kv, original in zip(swapper.kv_caches, originals):
        torch.testing.assert_close(kv[:, [20, 21, 22]], original, rtol=0, atol=0)


def test_swap_out_sees_writes_queued_before_it_and_precedes_later_writes():
    swapper = _swapper()
    kv = swapper.kv_caches[0]
    torch.cuda._sleep(50_000_000)  # a long kernel still running on the compute stream...
    kv[:, 4] = 1.5  # ...then a write queued behind it (a victim's last step)
    swapper.run(KVTransfers(device_to_host=[(4, 1)], host_to_device=[]))
    kv[:, 4] = -2.0  # the block reused by the next forward: queued after the copy on the compute stream
    torch.cuda.synchronize()
    assert bool((swapper.host_kv[1, 0] == 1.5).all())


def test_host_to_device_transfer_overlaps_work_already_queued_on_the_compute_stream():
    swapper = _swapper()
    swapper.host_kv[3].fill_(5.0)
    # Once before, so that the staging buffer and the pinned block ids come from the allocators' caches: a
    # first cudaMalloc or cudaHostAlloc may wait for the device and hide the overlap.
    swapper.run(KVTransfers(host_to_device=[(3, 12)]))
    torch.cuda.synchronize()
    torch.cuda._sleep(300_000_000)  # a forward still running on the compute stream (~0.2 s)
    swapper.run(KVTransfers(host_to_device=[(3, 12)]))
    swapper.copy_stream.synchronize()  # the transfer is done...
    assert not torch.cuda.current_stream().query()  # ...while the compute stream is still busy
    torch.cuda.synchronize()
    assert all(bool((kv[:, 12] == 5.0).all()) for kv in swapper.kv_caches)


def test_device_to_host_runs_before_host_to_device_in_one_step():
    swapper = _swapper()
    kv = swapper.kv_caches[1]
    kv[:, 9] = 3.0
    swapper.host_kv[4].fill_(7.0)
    # A victim's block 9 goes out to host block 0 while a resumed request's host block 4 comes into it.
    swapper.run(KVTransfers(device_to_host=[(9, 0)], host_to_device=[(4, 9)]))
    torch.cuda.synchronize()
    assert bool((swapper.host_kv[0, 1] == 3.0).all())
    assert bool((kv[:, 9] == 7.0).all())


def test_measured_costs_are_plausible_for_a_gpu():
    costs = measure_preemption_costs(SPEC, num_parameters=10**8, num_attention_heads=8, device=torch.device("cuda"))
    assert costs.matmul_flops_per_s > 1e12  # more than a TFLOP/s on any recent GPU
    assert 1e8 < costs.copy_bytes_per_s < 1e12  # PCIe / NVLink-C2C range
    # Long contexts favour swapping: recompute grows faster than the KV bytes.
    short, long = 64, 32768
    assert (costs.recompute_seconds(long) / costs.swap_seconds(long // 16)
            > costs.recompute_seconds(short) / costs.swap_seconds(short // 16))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = save_tiny_model(tmp_path_factory.mktemp("llama"), "llama")
    prompts = _prompts()
    return path, prompts, hf_greedy(path, prompts, 12)


@pytest.mark.parametrize("enforce_eager", [True, False])
def test_engine_with_swap_and_host_tier_matches_the_oracle_on_cuda(tiny_llama, enforce_eager):
    path, prompts, expected = tiny_llama
    llm = LLM(model=str(path), dtype="float32", device="cuda", max_model_len=128, block_size=4, num_kv_blocks=24,
              max_num_batched_tokens=32, swap_space=0.01, preemption_mode="swap", kv_offload_space=0.01,
              enforce_eager=enforce_eager)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for _ in range(2):
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in outputs] == expected
    core = llm.llm_engine.core
    stats = core.make_stats()
    assert stats.kv_offload.num_swapped_preemptions > 0 and stats.kv_offload.swap_in_bytes > 0
    assert stats.kv_offload.host_tier_offloaded_blocks > 0
    pool = core.scheduler.kv_cache_manager.block_pool
    assert pool.num_free_blocks == pool.num_blocks
    core.scheduler.kv_offload.check_all_free()


def test_consecutive_host_blocks_move_in_one_copy_each_run():
    from sluice.worker.kv_swap import _host_runs
    assert _host_runs([4, 5, 6, 9, 10, 2]) == [(0, 4, 3), (3, 9, 2), (5, 2, 1)]
    swapper = _swapper()
    originals = [kv[:, [1, 2, 3, 8]].clone() for kv in swapper.kv_caches]
    swapper.run(KVTransfers(device_to_host=[(1, 6), (2, 7), (3, 8), (8, 0)]))
    swapper.run(KVTransfers(host_to_device=[(6, 30), (7, 29), (8, 28), (0, 27)]))
    torch.cuda.synchronize()
    for kv, original in zip(swapper.kv_caches, originals):
        torch.testing.assert_close(kv[:, [30, 29, 28, 27]], original, rtol=0, atol=0)
