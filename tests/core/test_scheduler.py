"""Scheduler: token budget, chunked prefill, max_num_seqs, preemption, priority, aborts, prefix reuse."""
from __future__ import annotations

import random
import subprocess
import sys

import pytest

from sluice.core.request import RequestStatus
from tests.core.fakes import (
    FakeRunner, make_request, make_scheduler, reference_output, run_step, run_to_completion,
)


def test_chunked_prefill_splits_a_long_prompt_while_decodes_continue_in_the_same_step():
    scheduler = make_scheduler(max_num_batched_tokens=16)
    runner = FakeRunner.for_scheduler(scheduler)
    short_prompt, long_prompt = list(range(5)), list(range(100, 140))
    scheduler.add_request(make_request("short", short_prompt, max_tokens=8))
    run_step(scheduler, runner)  # short's whole prompt; it decodes from now on
    scheduler.add_request(make_request("long", long_prompt, max_tokens=3))

    steps = [run_step(scheduler, runner) for _ in range(3)]
    assert [o.num_scheduled_tokens for o, _ in steps] == [
        {"short": 1, "long": 15}, {"short": 1, "long": 15}, {"short": 1, "long": 10}]
    # A chunk that leaves prompt tokens uncomputed samples nothing; the last chunk samples.
    assert [[out.req_id for out in outs] for _, outs in steps] == [["short"], ["short"], ["short", "long"]]
    result = run_to_completion(scheduler, runner)
    assert result.tokens["long"] == reference_output(long_prompt, 3)[1:]


def test_long_prompt_is_computed_in_budget_sized_chunks_and_samples_only_at_the_end():
    scheduler = make_scheduler(max_num_batched_tokens=16)
    runner = FakeRunner.for_scheduler(scheduler)
    prompt = list(range(100, 140))
    scheduler.add_request(make_request("long", prompt, max_tokens=2))
    steps = [run_step(scheduler, runner) for _ in range(3)]
    assert [o.num_scheduled_tokens["long"] for o, _ in steps] == [16, 16, 8]
    assert [o.num_computed_tokens for o in steps[1][0].scheduled_cached_reqs] == [16]
    assert [outs for _, outs in steps[:2]] == [[], []]
    assert steps[2][1][0].new_token_ids == reference_output(prompt, 1)
    result = run_to_completion(scheduler, runner)
    assert result.tokens["long"] == reference_output(prompt, 2)[1:]
def test_long_prefill_token_threshold_caps_each_prompt_chunk_while_decodes_continue():
    scheduler = make_scheduler(max_num_batched_tokens=64, long_prefill_token_threshold=12)
    runner = FakeRunner.for_scheduler(scheduler)
    scheduler.add_request(make_request("short", list(range(5)), max_tokens=8))
    run_step(scheduler, runner)  # 5 prompt tokens: under the threshold, in one step
    long_prompt = list(range(100, 130))
    scheduler.add_request(make_request("long", long_prompt, max_tokens=3))
    steps = [run_step(scheduler, runner) for _ in range(3)]
    assert [o.num_scheduled_tokens for o, _ in steps] == [
        {"short": 1, "long": 12}, {"short": 1, "long": 12}, {"short": 1, "long": 6}]
    result = run_to_completion(scheduler, runner)
    assert result.tokens["long"] == reference_output(long_prompt, 3)[1:]


def test_new_requests_arrive_in_full_and_running_ones_as_new_block_ids_only():
    scheduler = make_scheduler(block_size=4)
    runner = FakeRunner.for_scheduler(scheduler)
    scheduler.add_request(make_request("a", list(range(7))))
    first, _ = run_step(scheduler, runner)
    [new] = first.scheduled_new_reqs
    assert (new.req_id, new.block_ids, new.num_computed_tokens, new.output_token_ids) == ("a", [0, 1], 0, [])
    assert first.scheduled_cached_reqs == []
    second, _ = run_step(scheduler, runner)  # position 7: still block 1
    third, _ = run_step(scheduler, runner)  # position 8: a new block
    assert second.scheduled_new_reqs == [] and third.scheduled_new_reqs == []
    assert [(c.new_block_ids, c.num_computed_tokens) for c in second.scheduled_cached_reqs] == [([], 7)]
    assert [(c.new_block_ids, c.num_computed_tokens) for c in third.scheduled_cached_reqs] == [([2], 8)]


def test_max_num_seqs_caps_running_requests():
    scheduler = make_scheduler(max_num_seqs=2)
    for i in range(3):
        scheduler.add_request(make_request(f"r{i}", [i + 1] * 3, max_tokens=4))
    output = scheduler.schedule()
    assert set(output.num_scheduled_tokens) == {"r0", "r1"}
    assert (len(scheduler.running), len(scheduler.waiting)) == (2, 1)
    scheduler.finish_requests("r0", RequestStatus.FINISHED_ABORTED)
    scheduler.finish_requests("r1", RequestStatus.FINISHED_ABORTED)
    assert set(scheduler.schedule().num_scheduled_tokens) == {"r2"}


def _two_growing_requests(scheduler):
    prompts = {"a": list(range(10)), "b": list(range(50, 60))}
    requests = [make_request(req_id, prompt, max_tokens=12, arrival_time=float(i))
                for i, (req_id, prompt) in enumerate(prompts.items())]
    for request in requests:
        scheduler.add_request(request)
    return prompts, requests


def test_running_out_of_blocks_preempts_the_last_running_request_which_resumes_identically():
    # 8 blocks of 4 slots; each request grows to 22 tokens (6 blocks): they cannot both fit.
    scheduler = make_scheduler(num_blocks=8, block_size=4, max_model_len=32, max_num_seqs=2)
    runner = FakeRunner.for_scheduler(scheduler)
    prompts, (_, b) = _two_growing_requests(scheduler)
    scheduler.add_request(make_request("c", [7], max_tokens=1, arrival_time=2.0))  # waits: max_num_seqs
    preempted_at = None
    while preempted_at is None:
        output, _ = run_step(scheduler, runner)
        if output.preempted_req_ids:
            preempted_at = output
    assert preempted_at.preempted_req_ids == {"b"}
    assert "b" not in preempted_at.num_scheduled_tokens
    assert [r.request_id for r in scheduler.waiting] == ["b", "c"]  # back in front of the queue
    assert scheduler.waiting[0].status == RequestStatus.PREEMPTED
    assert scheduler.waiting[0].num_computed_tokens == 0

    resumed = None
    while resumed is None:
        output, _ = run_step(scheduler, runner)
        resumed = next((new for new in output.scheduled_new_reqs if new.req_id == "b"), None)
    assert resumed.output_token_ids == reference_output(prompts["b"], len(resumed.output_token_ids))
    assert len(resumed.output_token_ids) > 0
    run_to_completion(scheduler, runner)
    assert scheduler.make_stats().num_preemptions == 1
    assert b.output_token_ids == reference_output(prompts["b"], 12)


def test_preempted_requests_produce_the_same_tokens_as_unpreempted_ones():
    roomy, tight = make_scheduler(num_blocks=64, max_model_len=32), make_scheduler(num_blocks=8, max_model_len=32)
    prompts, _ = _two_growing_requests(roomy)
    _two_growing_requests(tight)
    roomy_result, tight_result = run_to_completion(roomy), run_to_completion(tight)
    assert tight.num_preemptions > 0 and roomy.num_preemptions == 0
    assert tight_result.tokens == roomy_result.tokens
    assert roomy_result.tokens == {req_id: reference_output(p, 12) for req_id, p in prompts.items()}


def test_waiting_requests_wait_for_blocks_instead_of_preempting():
    scheduler = make_scheduler(num_blocks=8, block_size=4, max_model_len=32)
    runner = FakeRunner.for_scheduler(scheduler)
    scheduler.add_request(make_request("big", list(range(28)), max_tokens=4))  # 7 of 8 blocks
    run_step(scheduler, runner)
    scheduler.add_request(make_request("small", list(range(5)), max_tokens=1))  # needs 2 blocks
    output, _ = run_step(scheduler, runner)
    assert set(output.num_scheduled_tokens) == {"big"}
    assert output.preempted_req_ids == set()
    assert [r.request_id for r in scheduler.waiting] == ["small"]
    result = run_to_completion(scheduler, runner)
    assert result.finish_reasons == {"big": "length", "small": "length"}


@pytest.mark.parametrize("policy, expected_order", [("fcfs", ["a", "b", "c"]), ("priority", ["b", "c", "a"])])
def test_waiting_requests_are_admitted_in_policy_order(policy, expected_order):
    scheduler = make_scheduler(max_num_seqs=1, policy=policy)
    scheduler.add_request(make_request("a", [1, 2], max_tokens=2, priority=2, arrival_time=0.0))
    scheduler.add_request(make_request("b", [3, 4], max_tokens=2, priority=0, arrival_time=1.0))
    scheduler.add_request(make_request("c", [5, 6], max_tokens=2, priority=0, arrival_time=2.0))
    result = run_to_completion(scheduler)
    finish_order = [out.req_id for outs in result.outputs for out in outs if out.finished]
    assert finish_order == expected_order


def test_priority_preemption_takes_back_a_lower_priority_request_already_scheduled_this_step():
    scheduler = make_scheduler(num_blocks=6, block_size=4, max_model_len=24, policy="priority")
    runner = FakeRunner.for_scheduler(scheduler)
    low_prompt, high_prompt = list(range(8)), list(range(20, 32))
    low = make_request("low", low_prompt, max_tokens=10, priority=5, arrival_time=0.0)
    high = make_request("high", high_prompt, max_tokens=8, priority=0, arrival_time=1.0)
    scheduler.add_request(low)
    run_step(scheduler, runner)
    scheduler.add_request(high)
    run_step(scheduler, runner)  # low: 3 blocks, high: 3 blocks, pool full
    output, _ = run_step(scheduler, runner)
    # low (first in the running list) was scheduled before high ran out of blocks.
    assert output.preempted_req_ids == {"low"}
    assert output.num_scheduled_tokens == {"high": 1}
    assert output.total_num_scheduled_tokens == 1
    run_to_completion(scheduler, runner)
    assert high.output_token_ids == reference_output(high_prompt, 8)
    assert low.output_token_ids == reference_output(low_prompt, 10)


def test_aborting_a_running_request_frees_its_blocks_at_once_and_tells_the_runner_next_step():
    scheduler = make_scheduler(num_blocks=16, block_size=4)
    runner = FakeRunner.for_scheduler(scheduler)
    scheduler.add_request(make_request("a", list(range(9))))
    scheduler.add_request(make_request("b", list(range(20, 29))))
    run_step(scheduler, runner)
    free_before = scheduler.kv_cache_manager.num_free_blocks
    scheduler.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert scheduler.kv_cache_manager.num_free_blocks == free_before + 3
    output, _ = run_step(scheduler, runner)
    assert output.finished_req_ids == {"a"}
    assert set(output.num_scheduled_tokens) == {"b"}
    assert run_step(scheduler, runner)[0].finished_req_ids == set()
    scheduler.finish_requests(["b"], RequestStatus.FINISHED_ABORTED)
    scheduler.kv_cache_manager.block_pool.check_all_free()


def test_aborting_a_waiting_request_removes_it_and_unknown_ids_are_ignored():
    scheduler = make_scheduler(max_num_seqs=1)
    scheduler.add_request(make_request("running", [1, 2, 3]))
    scheduler.add_request(make_request("waiting", [4, 5, 6]))
    scheduler.schedule()
    scheduler.finish_requests(["waiting", "unknown-id"], RequestStatus.FINISHED_ABORTED)
    scheduler.finish_requests(["waiting"], RequestStatus.FINISHED_ABORTED)  # twice: ignored
    assert scheduler.waiting == [] and scheduler.get_num_unfinished_requests() == 1
    assert scheduler.schedule().finished_req_ids == {"waiting"}
    scheduler.finish_requests(["running"], RequestStatus.FINISHED_STOPPED)
    assert not scheduler.has_unfinished_requests()
    assert scheduler.has_requests()  # one more schedule() tells the runner about "running"
    assert scheduler.schedule().finished_req_ids == {"running"}
    assert not scheduler.has_requests()
    scheduler.kv_cache_manager.block_pool.check_all_free()


def test_aborting_a_preempted_request_removes_it_from_the_waiting_queue():
    scheduler = make_scheduler(num_blocks=8, block_size=4, max_model_len=32)
    runner = FakeRunner.for_scheduler(scheduler)
    _two_growing_requests(scheduler)
    while not run_step(scheduler, runner)[0].preempted_req_ids:
        pass
    scheduler.finish_requests(["b"], RequestStatus.FINISHED_ABORTED)
    assert scheduler.waiting == []
    result = run_to_completion(scheduler, runner)
    assert set(result.finish_reasons) == {"a"}


def test_finish_requests_needs_a_finished_status():
    scheduler = make_scheduler()
    with pytest.raises(ValueError, match="finished_status"):
        scheduler.finish_requests(["a"], RequestStatus.RUNNING)


def test_a_shared_prompt_prefix_is_computed_once_and_reported_as_cached():
    scheduler = make_scheduler(block_size=4)
    runner = FakeRunner.for_scheduler(scheduler)
    shared = list(range(100, 116))
    scheduler.add_request(make_request("first", shared + [1, 2], max_tokens=2))
    run_step(scheduler, runner)
    scheduler.add_request(make_request("second", shared + [3], max_tokens=2))
    output, _ = run_step(scheduler, runner)
    assert output.num_scheduled_tokens["second"] == 1  # 16 tokens came from the cache
    assert output.scheduled_new_reqs[0].num_computed_tokens == 16
    result = run_to_completion(scheduler, runner)
    finished = {out.req_id: out for outs in result.outputs for out in outs if out.finished}
    assert finished["second"].num_cached_tokens == 16
    assert result.tokens["second"] == reference_output(shared + [3], 2)[1:]
    stats = scheduler.make_stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (35, 16)


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
@pytest.mark.parametrize("enable_prefix_caching", [True, False])
def test_every_stream_matches_the_reference_under_a_tiny_budget_and_pool(policy, enable_prefix_caching):
    rng = random.Random(7)
    scheduler = make_scheduler(num_blocks=12, block_size=4, max_num_batched_tokens=16, max_num_seqs=4,
                               max_model_len=48, policy=policy, enable_prefix_caching=enable_prefix_caching)
    shared = [rng.randrange(1000) for _ in range(12)]
    expected = {}
    for i in range(16):
        prompt = (shared if i % 2 else []) + [rng.randrange(1000) for _ in range(rng.randrange(1, 20))]
        max_tokens = rng.randrange(1, 12)
        scheduler.add_request(make_request(f"r{i}", prompt, max_tokens=max_tokens, priority=rng.randrange(3),
                                           arrival_time=float(i)))
        expected[f"r{i}"] = reference_output(prompt, max_tokens)
    result = run_to_completion(scheduler)
    assert result.tokens == expected
    assert set(result.finish_reasons.values()) == {"length"}
    assert scheduler.num_preemptions > 0
    stats = scheduler.make_stats()
    assert (stats.num_running_reqs, stats.num_waiting_reqs, stats.kv_cache_usage) == (0, 0, 0.0)
    assert (stats.prefix_cache_hits > 0) == enable_prefix_caching


def test_add_request_rejects_duplicate_ids_and_prompts_longer_than_max_model_len():
    scheduler = make_scheduler(max_model_len=8)
    scheduler.add_request(make_request("a", [1]))
    with pytest.raises(ValueError, match="request_id"):
        scheduler.add_request(make_request("a", [2]))
    with pytest.raises(ValueError, match="prompt_token_ids"):
        scheduler.add_request(make_request("b", list(range(9))))


def test_unknown_policy_is_a_value_error_naming_the_field():
    with pytest.raises(ValueError, match="policy"):
        make_scheduler(policy="lifo")


def test_a_request_that_outgrows_the_whole_kv_cache_stops_at_its_capacity():
    scheduler = make_scheduler(num_blocks=3, block_size=4, max_model_len=64)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        scheduler.add_request(make_request("too-long", list(range(13))))
    scheduler.add_request(make_request("a", list(range(10)), max_tokens=None))
    result = run_to_completion(scheduler)
    assert (len(result.tokens["a"]), result.finish_reasons["a"]) == (2, "length")


def test_the_core_never_imports_torch():
    code = "import sys, sluice.core.scheduler; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
