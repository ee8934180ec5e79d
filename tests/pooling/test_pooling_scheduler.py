"""Pooling requests in the scheduler: prompt-only, chunked like any prompt, finished (and their blocks freed)
by the step whose pooled vector comes back; with async scheduling never scheduled past their prompt."""
from __future__ import annotations

import pytest

from sluice.config import CacheConfig, SchedulerConfig
from sluice.core.interface import ModelRunnerOutput
from sluice.core.request import Request
from sluice.core.scheduler import Scheduler
from sluice.pooling.front import _PROMPT_ONLY


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_pooling_request_finishes_with_its_prompt_and_frees_its_blocks(async_scheduling):
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8, max_model_len=64,
                                          async_scheduling=async_scheduling),
                          CacheConfig(block_size=4, enable_prefix_caching=True, num_blocks=16))
    scheduler.add_request(Request("p", list(range(1, 11)), _PROMPT_ONLY))  # 10 tokens: chunks of 8 and 2
    first = scheduler.schedule()
    assert first.num_scheduled_tokens == {"p": 8}
    assert scheduler.update_from_output(first, ModelRunnerOutput(["p"], {"p": []})) == []
    last = scheduler.schedule()
    assert last.num_scheduled_tokens == {"p": 2}
    if async_scheduling:  # the next step is scheduled before the vector is back: nothing left to run
        assert scheduler.schedule().is_empty()
    vector = b"\x00\x00\x80\x3f" * 3
    outputs = scheduler.update_from_output(last, ModelRunnerOutput(["p"], {"p": []}, pooler_output={"p": vector}))
    assert [(o.req_id, o.finish_reason, o.pooled_output, o.new_token_ids) for o in outputs] == [
        ("p", "stop", vector, [])]
    assert not scheduler.has_unfinished_requests()
    pool = scheduler.kv_cache_manager.block_pool
    assert pool.num_free_blocks == pool.num_blocks
