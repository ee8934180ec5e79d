"""Scheduler-side observability: KV block timings (--kv-cache-metrics), waiting by reason, first scheduling."""
from __future__ import annotations

import time

import pytest

from sluice.core.block_pool import BlockPool
from sluice.core.kv_metrics import TimedBlockPool, install_kv_cache_metrics
from tests.core.fakes import FakeRunner, make_request, make_scheduler, run_step, run_to_completion


def test_timed_pool_reports_lifetime_idle_time_and_reuse_gap_of_an_evicted_cached_block():
    pool = TimedBlockPool(num_blocks=2, sample_rate=1.0)
    block, other = pool.get_new_blocks(2)
    pool.cache_full_block(block, block_hash=123)
    time.sleep(0.02)
    pool.touch([block])  # a second user: a reuse gap of about 20 ms
    pool.free_blocks([block])
    pool.free_blocks([block, other])  # the last user lets go: idle from here
    time.sleep(0.03)
    pool.get_new_blocks(2)  # takes both: the cached one is evicted, the empty one is merely reused
    events = pool.drain_events()
    assert len(events.lifetimes) == len(events.idle_before_evict) == 1
    assert events.lifetimes[0] >= 0.05 > events.idle_before_evict[0] >= 0.03
    assert events.reuse_gaps == [pytest.approx(0.02, abs=0.015)]
    assert pool.drain_events().lifetimes == []  # handed out once


def test_unsampled_blocks_are_never_timed():
    pool = TimedBlockPool(num_blocks=4, sample_rate=1e-9)
    blocks = pool.get_new_blocks(4)
    for i, block in enumerate(blocks):
        pool.cache_full_block(block, i)
    pool.free_blocks(blocks)
    pool.get_new_blocks(4)
    assert pool.drain_events().lifetimes == []


def test_kv_cache_metrics_leave_outputs_unchanged_and_report_through_scheduler_stats():
    prompts = [list(range(i, i + 30)) for i in range(0, 120, 30)]
    results = []
    for timed in (False, True):
        scheduler = make_scheduler(num_blocks=24, block_size=4, max_num_batched_tokens=32)
        if timed:
            install_kv_cache_metrics(scheduler, sample_rate=1.0)
        for i, prompt in enumerate(prompts):
            scheduler.add_request(make_request(f"r{i}", prompt, max_tokens=20))
        results.append(run_to_completion(scheduler, FakeRunner.for_scheduler(scheduler)).tokens)
        stats = scheduler.make_stats()
        assert (stats.kv_cache_events is not None) == timed
    assert results[0] == results[1]
    assert type(make_scheduler().kv_cache_manager.block_pool) is BlockPool  # off: the plain pool, no cost


def test_waiting_requests_are_split_by_reason_capacity_or_deferred():
    scheduler = make_scheduler(max_num_seqs=1, max_num_batched_tokens=64)
    runner = FakeRunner.for_scheduler(scheduler)
    for i in range(3):
        scheduler.add_request(make_request(f"r{i}", [1, 2, 3, 4 + i], max_tokens=4))
    run_step(scheduler, runner)
    stats = scheduler.make_stats()
    assert (stats.num_waiting_reqs, stats.num_waiting_for_capacity) == (2, 2)  # max_num_seqs holds them back

    scheduler = make_scheduler(max_num_batched_tokens=8)
    runner = FakeRunner.for_scheduler(scheduler)
    for i in range(3):
        scheduler.add_request(make_request(f"r{i}", list(range(10 * i, 10 * i + 8)), max_tokens=4))
    run_step(scheduler, runner)
    stats = scheduler.make_stats()
    assert (stats.num_waiting_reqs, stats.num_waiting_for_capacity) == (2, 0)  # only the token budget: deferred


def test_first_scheduled_time_is_set_once_and_sent_with_the_first_token():
    scheduler = make_scheduler()
    runner = FakeRunner.for_scheduler(scheduler)
    request = make_request("r", [1, 2, 3], max_tokens=3, arrival_time=time.monotonic())
    scheduler.add_request(request)
    _, outputs = run_step(scheduler, runner)
    assert request.arrival_time <= request.first_scheduled_time <= time.monotonic()
    assert outputs[0].scheduled_time == request.first_scheduled_time
    _, outputs = run_step(scheduler, runner)
    assert outputs[0].scheduled_time is None
