"""Swap preemption and the host prefix-cache tier end to end on a tiny Llama (float32, CPU).

Greedy output equals transformers' generate token for token with preemption forced into swap mode, chunked
prefill and prefix caching, synchronous and async scheduling; a second chat turn whose first turn the device
cache has evicted hits the host tier and produces the same tokens; a full swap space falls back to recompute.
After every run, and after aborts, every device block and every swap block is free.
"""
from __future__ import annotations

import pytest

from sluice import LLM, SamplingParams
from tests.engine.test_hf_equivalence import _prompts, assert_no_leaked_blocks
from tests.tiny_models import hf_greedy, save_tiny_model

MAX_NEW_TOKENS = 12
BLOCK_SIZE = 4
# Tiny Llama: 2 layers x K and V x 4 slots x 2 KV heads x head_dim 16 x 4 bytes.
BYTES_PER_BLOCK = 2 * 2 * BLOCK_SIZE * 2 * 16 * 4


def _gib(num_blocks: int) -> float:
    return num_blocks * BYTES_PER_BLOCK / 2**30


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = save_tiny_model(tmp_path_factory.mktemp("llama"), "llama")
    prompts = _prompts()
    return path, prompts, hf_greedy(path, prompts, MAX_NEW_TOKENS)


def _llm(path, **kwargs) -> LLM:
    return LLM(model=str(path), dtype="float32", device="cpu", max_model_len=128, block_size=BLOCK_SIZE, **kwargs)


def assert_no_leaked_host_blocks(llm: LLM) -> None:
    assert_no_leaked_blocks(llm)
    llm.llm_engine.core.scheduler.kv_offload.check_all_free()


def _greedy(max_tokens: int = MAX_NEW_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def _generate(llm: LLM, prompts: list[list[int]], max_tokens: int = MAX_NEW_TOKENS) -> list[list[int]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], _greedy(max_tokens), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_swap_preemption_matches_transformers(tiny_llama, async_scheduling):
    path, prompts, expected = tiny_llama
    llm = _llm(path, num_kv_blocks=24, max_num_batched_tokens=32, swap_space=_gib(256), preemption_mode="swap",
               async_scheduling=async_scheduling)
    for _ in range(2):  # the second round also hits the prefix cache
        assert _generate(llm, prompts) == expected
        assert_no_leaked_host_blocks(llm)
    stats = llm.llm_engine.core.make_stats()
    assert stats.kv_offload.num_swapped_preemptions > 0
    assert stats.kv_offload.num_recomputed_preemptions == 0
    assert stats.kv_offload.swap_in_bytes > 0
    assert stats.prefix_cache_hits > 0


def test_full_swap_space_falls_back_to_recompute(tiny_llama):
    path, prompts, expected = tiny_llama
    llm = _llm(path, num_kv_blocks=24, max_num_batched_tokens=32, swap_space=_gib(6), preemption_mode="swap")
    assert _generate(llm, prompts) == expected
    assert_no_leaked_host_blocks(llm)
    stats = llm.llm_engine.core.make_stats().kv_offload
    assert stats.num_swapped_preemptions > 0 and stats.num_recomputed_preemptions > 0


def test_auto_mode_measures_costs_at_start_up(tiny_llama):
    path, prompts, expected = tiny_llama
    llm = _llm(path, num_kv_blocks=24, max_num_batched_tokens=32, swap_space=_gib(256))
    offload = llm.llm_engine.core.scheduler.kv_offload
    assert offload.preemption_mode == "auto"
    assert offload.costs.matmul_flops_per_s > 0 and offload.costs.copy_bytes_per_s > 0
    assert offload.costs.bytes_per_block == BYTES_PER_BLOCK
    assert _generate(llm, prompts) == expected
    assert_no_leaked_host_blocks(llm)
    assert llm.llm_engine.core.make_stats().num_preemptions > 0


def test_second_turn_after_device_eviction_hits_the_host_tier(tiny_llama):
    path, prompts, _ = tiny_llama
    llm = _llm(path, num_kv_blocks=40, kv_offload_space=_gib(256))
    first_turn = prompts[7]  # 64 tokens
    (answer,) = _generate(llm, [first_turn], max_tokens=8)
    for filler in prompts[:7]:  # fills and reuses the device pool: the first turn's blocks are evicted
        _generate(llm, [filler[:1] * 3 + filler + [5] * 40], max_tokens=4)
    second_turn = first_turn + answer + [17, 23, 42]
    core = llm.llm_engine.core
    before = core.make_stats()
    (reply,) = _generate(llm, [second_turn], max_tokens=8)
    after = core.make_stats()
    assert reply == hf_greedy(path, [second_turn], 8)[0]
    host_hits = after.kv_offload.host_tier_hits - before.kv_offload.host_tier_hits
    assert host_hits >= 64  # the first turn's full blocks came back from host memory
    assert after.prefix_cache_hits - before.prefix_cache_hits >= host_hits
    assert_no_leaked_host_blocks(llm)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_aborts_return_device_and_host_blocks(tiny_llama, async_scheduling):
    path, prompts, _ = tiny_llama
    llm = _llm(path, num_kv_blocks=24, max_num_batched_tokens=32, swap_space=_gib(256), preemption_mode="swap",
               kv_offload_space=_gib(32), async_scheduling=async_scheduling)
    engine = llm.llm_engine
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", {"prompt_token_ids": prompt}, _greedy(30))
    offload = engine.core.scheduler.kv_offload
    for _ in range(200):
        engine.step()
        if offload.swapped:
            break
    assert offload.swapped
    engine.abort_request([f"r{i}" for i in range(0, len(prompts), 2)] + list(offload.swapped))
    while engine.has_unfinished_requests():
        engine.step()
    engine.step()  # a step still in flight is collected
    assert_no_leaked_host_blocks(llm)


def test_cpu_copies_round_trip_blocks_through_host_memory():
    import torch

    from sluice.core.kv_offload import KVTransfers
    from sluice.worker.kv_cache import KVCacheSpec, allocate_kv_caches
    from sluice.worker.kv_swap import KVSwapper, _host_runs

    assert _host_runs([4, 5, 6, 9, 10, 2]) == [(0, 4, 3), (3, 9, 2), (5, 2, 1)]
    spec = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.float32)
    kv_caches = allocate_kv_caches(spec, 16, torch.device("cpu"))
    for kv in kv_caches:
        kv.normal_()
    swapper = KVSwapper(spec, 8, kv_caches, torch.device("cpu"))
    originals = [kv[:, [1, 2, 3, 8]].clone() for kv in kv_caches]
    # Block 8 goes out while host block 6 (block 1's copy) comes back into it: out first, then in.
    swapper.run(KVTransfers(device_to_host=[(1, 6), (2, 7), (3, 5), (8, 0)]))
    swapper.run(KVTransfers(device_to_host=[(8, 1)], host_to_device=[(6, 8), (7, 12), (5, 13), (0, 14)]))
    for kv, original in zip(kv_caches, originals):
        assert torch.equal(kv[:, [8, 12, 13, 14]], original)
    assert torch.equal(swapper.host_kv[1], swapper.host_kv[0])
