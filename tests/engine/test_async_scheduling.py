"""Async scheduling gives exactly the outputs of synchronous scheduling (float32, CPU).

With async scheduling each step is scheduled and launched before the previous step's samples
reach the host; the runner feeds pending tokens from the device. Requests that stop on a stop
token waste one step whose sample is dropped; nothing else may differ, and every KV block comes
back whatever ends a request (length, stop token, abort, preemption).
"""
from __future__ import annotations

import random

import pytest

from sluice import LLM, SamplingParams
from sluice.core.request import Request
from sluice.core.scheduler import Scheduler
from sluice.config import CacheConfig, SchedulerConfig
from sluice.core.interface import ModelRunnerOutput
from tests.tiny_models import save_tiny_model

VOCAB_SIZE = 384


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


def _llm(model_path, async_scheduling: bool, **kwargs) -> LLM:
    return LLM(model=str(model_path), dtype="float32", device="cpu", max_model_len=128,
               async_scheduling=async_scheduling, **kwargs)


def _assert_no_leaked_blocks(llm: LLM) -> None:
    pool = llm.llm_engine.core.scheduler.kv_cache_manager.block_pool
    assert not llm.llm_engine.has_unfinished_requests()
    assert pool.num_free_blocks == pool.num_blocks
    assert all(block.ref_cnt == 0 for block in pool.blocks)


def _prompts() -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(4, VOCAB_SIZE) for _ in range(rng.randrange(1, 40))] for _ in range(16)]


def _params(stop_token: int) -> list[SamplingParams]:
    rng = random.Random(8)
    params = []
    for i in range(16):
        kind = i % 4
        if kind == 0:
            params.append(SamplingParams(temperature=0.0, max_tokens=rng.randrange(1, 20), ignore_eos=True))
        elif kind == 1:  # may stop early on a token the model emits often
            params.append(SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[stop_token], ignore_eos=True))
        elif kind == 2:  # seeded sampling: the request's own generator, same draws in both modes
            params.append(SamplingParams(temperature=1.0, seed=i, max_tokens=15, ignore_eos=True))
        elif i % 8 == 3:  # penalties count every earlier output token, the one still in flight on the device
            params.append(SamplingParams(temperature=0.0, max_tokens=15, repetition_penalty=1.3,
                                         frequency_penalty=0.5, presence_penalty=0.3, ignore_eos=True,
                                         logprobs=2))
        else:  # min_tokens bans the stop token until the 9th output token, counting the one in flight
            params.append(SamplingParams(temperature=0.0, max_tokens=20, min_tokens=9, stop_token_ids=[stop_token],
                                         ignore_eos=True))
    return params


@pytest.mark.parametrize("engine_kwargs", [
    dict(),
    dict(max_num_batched_tokens=16),
    dict(num_kv_blocks=20, block_size=4, max_num_batched_tokens=32),
    dict(num_kv_blocks=20, block_size=4, enable_prefix_caching=False),
], ids=["default", "budget_16", "forced_preemption", "preemption_no_prefix_cache"])
def test_async_scheduling_matches_sync_outputs(model_path, engine_kwargs):
    sync_llm = _llm(model_path, False, **engine_kwargs)
    inputs = [{"prompt_token_ids": p} for p in _prompts()]
    # A token the second request (greedy, stop_token_ids) emits midway, so that it stops there.
    probe = sync_llm.generate(inputs[1], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
                              use_tqdm=False)
    params = _params(stop_token=probe[0].outputs[0].token_ids[6])
    expected = sync_llm.generate(inputs, params, use_tqdm=False)
    async_llm = _llm(model_path, True, **engine_kwargs)
    runner = async_llm.llm_engine.core.runner
    pending_from_device = []
    original_pending = runner._pending

    def counting_pending(step_inputs):
        pending = original_pending(step_inputs)
        pending_from_device.append(0 if pending is None else len(pending[0]))
        return pending

    runner._pending = counting_pending
    collected_first = []
    must_collect_first = runner.must_collect_first
    runner.must_collect_first = lambda out: collected_first.append(must_collect_first(out)) or collected_first[-1]
    got = async_llm.generate(inputs, params, use_tqdm=False)
    # Steps ran ahead of their inputs: those token ids came from the previous step's samples, and no
    # step waited for the previous one, penalties and min_tokens included.
    assert sum(pending_from_device) > 0
    assert collected_first and not any(collected_first)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    assert [o.outputs[0].finish_reason for o in got] == [o.outputs[0].finish_reason for o in expected]
    assert [o.outputs[0].stop_reason for o in got] == [o.outputs[0].stop_reason for o in expected]
    for g, e in zip(got, expected):
        if e.outputs[0].logprobs is not None:
            assert [sorted(step) for step in g.outputs[0].logprobs] == [sorted(step) for step in e.outputs[0].logprobs]
    assert any(o.outputs[0].finish_reason == "stop" for o in got)  # the stop token path ran
    _assert_no_leaked_blocks(async_llm)
    if "num_kv_blocks" in engine_kwargs:
        assert async_llm.llm_engine.core.make_stats().num_preemptions > 0


def test_aborts_while_a_step_is_in_flight_return_every_block(model_path):
    llm = _llm(model_path, True)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    for i in range(6):
        engine.add_request(f"r{i}", {"prompt_token_ids": list(range(4 + i, 20 + i))}, params)
    for _ in range(3):
        engine.step()
    assert engine.core._in_flight is not None
    engine.abort_request(["r0", "r3"])
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    assert set(finished) == {"r1", "r2", "r4", "r5"}
    assert all(len(o.outputs[0].token_ids) == 30 for o in finished.values())
    _assert_no_leaked_blocks(llm)
    # A step still in flight after the last abort is collected by the next one; new work runs normally.
    out = llm.generate([{"prompt_token_ids": [9, 9, 9]}], params, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 30
    _assert_no_leaked_blocks(llm)


def _scheduler(max_model_len: int = 64) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=max_model_len,
                                     async_scheduling=True),
                     CacheConfig(block_size=4, enable_prefix_caching=True, num_blocks=32))


def test_pending_sample_is_scheduled_before_it_is_known():
    scheduler = _scheduler()
    request = Request("a", [1, 2, 3, 4, 5], SamplingParams(max_tokens=3, ignore_eos=True))
    scheduler.add_request(request)
    first = scheduler.schedule()
    assert first.num_scheduled_tokens == {"a": 5} and request.num_output_placeholders == 1
    second = scheduler.schedule()  # before the first step's sample is back
    assert second.num_scheduled_tokens == {"a": 1} and request.num_output_placeholders == 2
    scheduler.update_from_output(first, ModelRunnerOutput(["a"], {"a": [42]}))
    assert request.output_token_ids == [42] and request.num_output_placeholders == 1
    # Two samples are on their way to a request with max_tokens=3: one more step, then none.
    third = scheduler.schedule()
    assert third.num_scheduled_tokens == {"a": 1}
    assert scheduler.schedule().is_empty()
    scheduler.update_from_output(second, ModelRunnerOutput(["a"], {"a": [43]}))
    outputs = scheduler.update_from_output(third, ModelRunnerOutput(["a"], {"a": [44]}))
    assert outputs[0].finish_reason == "length" and request.output_token_ids == [42, 43, 44]
    assert scheduler.kv_cache_manager.num_free_blocks == 32


def test_sample_after_a_stop_token_is_dropped():
    scheduler = _scheduler()
    request = Request("a", [1, 2, 3], SamplingParams(max_tokens=10, stop_token_ids=[7], ignore_eos=True))
    scheduler.add_request(request)
    first, second = scheduler.schedule(), scheduler.schedule()
    outputs = scheduler.update_from_output(first, ModelRunnerOutput(["a"], {"a": [7]}))
    assert outputs[0].finish_reason == "stop" and outputs[0].new_token_ids == [7]
    assert scheduler.update_from_output(second, ModelRunnerOutput(["a"], {"a": [8]})) == []
    assert scheduler.kv_cache_manager.num_free_blocks == 32
    assert not scheduler.has_unfinished_requests()
