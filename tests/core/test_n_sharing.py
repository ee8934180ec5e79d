"""The children of an n > 1 request share the prompt's full KV blocks even with prefix caching off.

Children are named ``"{index}_{parent_id}"`` by the engine front; the KV cache manager keys
their prompt-block hashes to the parent id, so siblings find each other's blocks while any
of them holds them, and nothing else does (no caching across requests, no output sharing).
"""
from __future__ import annotations

import random

from sluice.core.kv_cache_manager import KVCacheManager, sibling_group
from tests.core.fakes import FakeRunner, make_request, make_scheduler, reference_output, run_step, run_to_completion

BLOCK_SIZE = 4


def _admit(manager: KVCacheManager, request) -> int:
    """What the scheduler does for a waiting request; returns the tokens served from shared blocks."""
    hits, num_computed = manager.get_computed_blocks(request)
    assert manager.allocate_slots(request, request.num_tokens - num_computed, hits) is not None
    request.num_computed_tokens = request.num_tokens
    return num_computed


def _manager(num_blocks: int = 16) -> KVCacheManager:
    return KVCacheManager(num_blocks=num_blocks, block_size=BLOCK_SIZE, enable_prefix_caching=False)


def test_sibling_group_is_the_parent_request_id():
    assert sibling_group(make_request("3_cmpl-ab_c", [1], parent_request_id="cmpl-ab_c")) == "cmpl-ab_c"
    assert sibling_group(make_request("0_looks_like_a_child", [1])) is None
    assert sibling_group(make_request("12", [1])) is None


def test_siblings_share_the_prompts_full_blocks_without_prefix_caching():
    manager = _manager()
    prompt = list(range(10))  # 2 full blocks + 2 tokens
    children = [make_request(f"{i}_r", prompt, parent_request_id="r") for i in range(4)]
    assert [_admit(manager, child) for child in children] == [0, 8, 8, 8]
    tables = [manager.get_block_ids(child.request_id) for child in children]
    assert all(table[:2] == tables[0][:2] for table in tables)
    assert all(manager.block_pool.blocks[b].ref_cnt == 4 for b in tables[0][:2])
    assert len({table[2] for table in tables}) == 4  # each child computes its own partial block
    assert manager.num_free_blocks == 16 - (2 + 4)
    assert manager.prefix_cache_stats.queries == 0  # prefix caching stays off


def test_requests_that_are_not_siblings_share_nothing_without_prefix_caching():
    manager = _manager()
    prompt = list(range(10))
    requests = [make_request("a", prompt), make_request("b", prompt), make_request("0_r", prompt, parent_request_id="r"),
                make_request("0_s", prompt, parent_request_id="s")]
    assert [_admit(manager, request) for request in requests] == [0, 0, 0, 0]
    assert manager.num_free_blocks == 16 - 4 * 3


def test_shared_blocks_outlive_a_finished_sibling_but_not_the_last_one():
    manager = _manager()
    prompt = list(range(9))
    first, second, third, late = (make_request(f"{i}_r", prompt, parent_request_id="r") for i in range(4))
    _admit(manager, first)
    _admit(manager, second)
    manager.free(first)
    assert _admit(manager, third) == 8  # the second child still holds the shared blocks
    manager.free(second)
    manager.free(third)
    manager.block_pool.check_all_free()
    assert manager.block_pool.cached_block_hash_to_block == {}
    assert all(block.block_hash is None for block in manager.block_pool.blocks)
    assert _admit(manager, late) == 0  # nothing survives the siblings: no caching across time


def test_only_prompt_blocks_are_shared_never_output_blocks():
    manager = _manager()
    prompt = list(range(6))
    first, second = make_request("0_r", prompt, parent_request_id="r"), make_request("1_r", prompt, parent_request_id="r")
    _admit(manager, first)
    first.append_output_token_ids([50, 51, 52])  # tokens 6..8: block 1 is full of prompt + output
    assert manager.allocate_slots(first, 3) is not None
    first.num_computed_tokens = first.num_tokens
    second.append_output_token_ids([50, 51, 52])  # identical output, still not shareable
    assert _admit(manager, second) == 4
    assert manager.get_block_ids("0_r")[0] == manager.get_block_ids("1_r")[0]
    assert manager.get_block_ids("0_r")[1] != manager.get_block_ids("1_r")[1]


def test_sibling_streams_match_the_reference_under_a_tiny_budget_and_pool():
    """Children admitted in the same step read blocks a sibling writes in that step; preemption frees them."""
    rng = random.Random(3)
    scheduler = make_scheduler(num_blocks=14, block_size=BLOCK_SIZE, max_num_batched_tokens=16, max_num_seqs=6,
                               max_model_len=64, enable_prefix_caching=False)
    expected = {}
    for parent in ("p", "q"):
        prompt = [rng.randrange(1000) for _ in range(rng.randrange(9, 20))]
        for i in range(4):
            scheduler.add_request(make_request(f"{i}_{parent}", prompt, parent_request_id=parent, max_tokens=10))
            expected[f"{i}_{parent}"] = reference_output(prompt, 10)
    result = run_to_completion(scheduler)
    assert result.tokens == expected
    assert scheduler.num_preemptions > 0


def test_siblings_admitted_together_compute_the_shared_prompt_once():
    scheduler = make_scheduler(block_size=BLOCK_SIZE, max_num_batched_tokens=64, enable_prefix_caching=False)
    runner = FakeRunner.for_scheduler(scheduler)
    prompt = list(range(100, 113))  # 3 full blocks + 1 token
    for i in range(3):
        scheduler.add_request(make_request(f"{i}_r", prompt, parent_request_id="r", max_tokens=3))
    output, _ = run_step(scheduler, runner)
    assert output.num_scheduled_tokens == {"0_r": 13, "1_r": 1, "2_r": 1}
    result = run_to_completion(scheduler, runner)
    assert all(tokens == reference_output(prompt, 3)[1:] for tokens in result.tokens.values())
