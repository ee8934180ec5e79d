"""Swap preemption and the host prefix-cache tier (core/kv_offload.py), against the fake runner's paged KV.

The fake runner copies slots between its device blocks and host blocks exactly as the scheduler's
``kv_transfers`` say, and samples from the context it reads back out of the device slots: a swapped request
that resumed from the wrong host block, or a host-tier hit copied into the wrong device block, changes the
token stream.
"""
from __future__ import annotations

import pytest

from sluice.core.kv_offload import KVOffload, PreemptionCosts
from sluice.core.request import RequestStatus
from tests.core.fakes import FakeRunner, make_request, make_scheduler, reference_output, run_step, run_to_completion

PROMPTS = {"a": [1, 2, 3, 4, 5, 6, 7], "b": [11, 12, 13, 14, 15, 16, 17, 18, 19], "c": [21, 22, 23]}


def _add_growing_requests(scheduler, max_tokens: int = 14) -> None:
    for i, (req_id, prompt) in enumerate(PROMPTS.items()):
        scheduler.add_request(make_request(req_id, prompt, max_tokens=max_tokens, arrival_time=float(i)))


def _expected(max_tokens: int = 14) -> dict[str, list[int]]:
    return {req_id: reference_output(prompt, max_tokens) for req_id, prompt in PROMPTS.items()}


@pytest.mark.parametrize("enable_prefix_caching", [True, False])
def test_swapped_requests_resume_from_host_blocks_with_identical_output(enable_prefix_caching):
    scheduler = make_scheduler(num_blocks=10, max_model_len=32, num_swap_blocks=32,
                               enable_prefix_caching=enable_prefix_caching)
    _add_growing_requests(scheduler)
    result = run_to_completion(scheduler)
    stats = scheduler.make_stats().kv_offload
    assert stats.num_swapped_preemptions > 0 and stats.num_recomputed_preemptions == 0
    assert stats.swap_out_bytes > 0 and stats.swap_in_bytes > 0
    assert result.tokens == _expected()


def test_a_swapped_request_restarts_at_its_swapped_tokens_copied_back_before_it_runs():
    scheduler = make_scheduler(num_blocks=10, max_model_len=32, num_swap_blocks=32, enable_prefix_caching=False)
    runner = FakeRunner.for_scheduler(scheduler)
    _add_growing_requests(scheduler)
    offload = scheduler.kv_offload
    while True:
        output, _ = run_step(scheduler, runner)
        if output.preempted_req_ids:
            break
    (victim_id,) = output.preempted_req_ids
    victim = next(r for r in scheduler.waiting if r.request_id == victim_id)
    host_blocks, num_swapped = offload.swapped[victim_id]
    assert victim.status == RequestStatus.PREEMPTED and victim.num_computed_tokens == 0
    assert len(host_blocks) == -(-num_swapped // 4)
    assert [host for _, host in output.kv_transfers.device_to_host] == host_blocks
    while True:
        output, _ = run_step(scheduler, runner)
        resumed = next((new for new in output.scheduled_new_reqs if new.req_id == victim_id), None)
        if resumed is not None:
            break
    assert resumed.num_computed_tokens == num_swapped  # nothing recomputed
    assert set(zip(host_blocks, resumed.block_ids)) <= set(output.kv_transfers.host_to_device)
    assert victim_id not in offload.swapped
    run_to_completion(scheduler, runner)


def test_full_swap_space_falls_back_to_recompute():
    scheduler = make_scheduler(num_blocks=10, max_model_len=32, num_swap_blocks=1)
    _add_growing_requests(scheduler)
    result = run_to_completion(scheduler)
    stats = scheduler.make_stats()
    assert stats.kv_offload.num_recomputed_preemptions > 0
    assert stats.num_preemptions == stats.kv_offload.num_recomputed_preemptions + stats.kv_offload.num_swapped_preemptions
    assert result.tokens == _expected()


def test_recompute_mode_never_swaps():
    scheduler = make_scheduler(num_blocks=10, max_model_len=32, num_swap_blocks=32, preemption_mode="recompute")
    _add_growing_requests(scheduler)
    result = run_to_completion(scheduler)
    stats = scheduler.make_stats().kv_offload
    assert stats.num_swapped_preemptions == 0 and stats.num_recomputed_preemptions > 0
    assert result.tokens == _expected()


def test_auto_mode_recomputes_short_contexts_and_swaps_long_ones():
    # Recompute of T tokens: T^2 / 2 / 16 s; swap of its T / 4 blocks: 2 * T / 4 s. Even at T = 16.
    costs = PreemptionCosts(flops_per_token=0.0, attention_flops_per_token_pair=1.0, matmul_flops_per_s=16.0,
                            bytes_per_block=1, copy_bytes_per_s=1.0)
    assert costs.recompute_seconds(8) < costs.swap_seconds(2)
    assert costs.recompute_seconds(32) > costs.swap_seconds(8)
    scheduler = make_scheduler(num_blocks=64, max_model_len=64, num_swap_blocks=64, preemption_mode="auto",
                               costs=costs)
    short = make_request("short", list(range(1, 9)))
    long = make_request("long", list(range(1, 33)))
    for request in (short, long):
        scheduler.add_request(request)
    run_step(scheduler, FakeRunner.for_scheduler(scheduler))
    offload = scheduler.kv_offload
    assert not offload.swap_out(short, scheduler.kv_cache_manager)
    assert offload.swap_out(long, scheduler.kv_cache_manager)


def test_auto_mode_needs_measured_costs():
    with pytest.raises(ValueError, match="PreemptionCosts"):
        KVOffload(4, 1, num_swap_blocks=8, preemption_mode="auto")


def test_aborting_a_swapped_request_frees_its_host_blocks():
    scheduler = make_scheduler(num_blocks=10, max_model_len=32, num_swap_blocks=32, enable_prefix_caching=False)
    runner = FakeRunner.for_scheduler(scheduler)
    _add_growing_requests(scheduler)
    while not scheduler.kv_offload.swapped:
        run_step(scheduler, runner)
    scheduler.finish_requests(list(scheduler.kv_offload.swapped), RequestStatus.FINISHED_ABORTED)
    assert not scheduler.kv_offload.swapped
    run_to_completion(scheduler, runner)  # checks device and host blocks


def _evict_device_cache(scheduler, runner, prompt_base: int) -> None:
    """Runs unrelated prompts until the device pool has reused every block."""
    for i in range(3):
        scheduler.add_request(make_request(f"filler{i}", [prompt_base + i * 20 + k for k in range(16)], max_tokens=4))
        run_to_completion(scheduler, runner)


def test_second_turn_after_device_eviction_hits_the_host_tier():
    scheduler = make_scheduler(num_blocks=8, max_model_len=32, num_offload_blocks=16)
    runner = FakeRunner.for_scheduler(scheduler)
    first_turn = list(range(100, 113))
    scheduler.add_request(make_request("turn1", first_turn, max_tokens=4))
    answer = run_to_completion(scheduler, runner).tokens["turn1"]
    _evict_device_cache(scheduler, runner, 500)
    second_turn = first_turn + answer + [7, 8, 9]
    scheduler.add_request(make_request("turn2", second_turn, max_tokens=6))
    computed, num_device_hits = scheduler.kv_cache_manager.get_computed_blocks(scheduler.requests["turn2"])
    assert num_device_hits == 0  # the device cache forgot the first turn
    hits_before = scheduler.make_stats().prefix_cache_hits
    result = run_to_completion(scheduler, runner)
    stats = scheduler.make_stats()
    assert stats.kv_offload.host_tier_hits == 16  # 4 full blocks of the 17-token first turn
    assert stats.prefix_cache_hits - hits_before == 16
    assert result.tokens["turn2"] == reference_output(second_turn, 6)


def test_host_tier_is_lru_and_bounded():
    scheduler = make_scheduler(num_blocks=8, max_model_len=32, num_offload_blocks=4)
    runner = FakeRunner.for_scheduler(scheduler)
    _evict_device_cache(scheduler, runner, 500)
    _evict_device_cache(scheduler, runner, 900)
    offload = scheduler.kv_offload
    assert len(offload.host_tier) == 4
    assert offload.stats.host_tier_offloaded_blocks > 4
    offload.check_all_free()


def test_swap_and_host_tier_together_keep_outputs_and_blocks():
    scheduler = make_scheduler(num_blocks=10, max_model_len=32, num_swap_blocks=6, num_offload_blocks=8)
    runner = FakeRunner.for_scheduler(scheduler)
    for round_ in range(2):
        _add_growing_requests(scheduler)
        result = run_to_completion(scheduler, runner)
        assert result.tokens == _expected()
    assert scheduler.make_stats().kv_offload.num_swapped_preemptions > 0


def test_offload_stats_become_prometheus_counters():
    from prometheus_client import CollectorRegistry

    from sluice.metrics import SchedulerMetrics
    scheduler = make_scheduler(num_blocks=10, max_model_len=32, num_swap_blocks=6, num_offload_blocks=8)
    _add_growing_requests(scheduler)
    run_to_completion(scheduler)
    registry = CollectorRegistry()
    metrics = SchedulerMetrics("m", registry)
    stats = scheduler.make_stats()
    metrics.record(stats)
    metrics.record(scheduler.make_stats())  # cumulative totals: counted once

    def value(name: str, **labels) -> float:
        return registry.get_sample_value("sluice:" + name, {"model_name": "m", **labels})

    offload = stats.kv_offload
    assert value("num_preemptions_by_mode_total", mode="swap") == offload.num_swapped_preemptions > 0
    assert value("num_preemptions_by_mode_total", mode="recompute") == offload.num_recomputed_preemptions
    assert value("kv_swap_bytes_total", direction="out") == offload.swap_out_bytes > 0
    assert value("kv_swap_bytes_total", direction="in") == offload.swap_in_bytes
    assert value("prefix_cache_host_hits_total") == offload.host_tier_hits
    assert value("kv_offload_blocks_total") == offload.host_tier_offloaded_blocks
    assert value("num_preemptions_total") == stats.num_preemptions


def test_host_tier_hits_survive_the_evictions_their_own_allocation_causes():
    # A tier of 4 blocks, all holding the first turn: admitting the second turn evicts device blocks into the
    # full tier while it loads from it; the entries it loads are never the ones that make room.
    scheduler = make_scheduler(num_blocks=8, max_model_len=32, num_offload_blocks=4)
    runner = FakeRunner.for_scheduler(scheduler)
    first_turn = list(range(100, 116))
    scheduler.add_request(make_request("turn1", first_turn, max_tokens=1))
    run_to_completion(scheduler, runner)
    _evict_device_cache(scheduler, runner, 500)
    offload = scheduler.kv_offload
    offload.host_tier.clear()
    offload._free_tier_blocks = [3, 2, 1, 0]
    scheduler.add_request(make_request("again", first_turn, max_tokens=1))
    request = scheduler.requests["again"]
    scheduler.kv_cache_manager.get_computed_blocks(request)  # fills request.block_hashes
    for i, block_hash in enumerate(request.block_hashes[:3]):  # as if evicted into the tier earlier
        offload.host_tier[block_hash] = offload._free_tier_blocks.pop()
        runner.host_kv[offload.host_tier[block_hash]] = [(4 * i + k, first_turn[4 * i + k]) for k in range(4)]
    offload.host_tier[12345] = offload._free_tier_blocks.pop()  # the LRU head after the hits are touched
    offloaded_before = offload.stats.host_tier_offloaded_blocks
    result = run_to_completion(scheduler, runner)
    assert offload.stats.host_tier_offloaded_blocks > offloaded_before  # the admission evicted into the tier
    assert offload.stats.host_tier_hits == 12
    assert result.tokens["again"] == reference_output(first_turn, 1)
