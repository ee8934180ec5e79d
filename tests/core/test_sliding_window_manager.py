"""SlidingWindowKVCacheManager: a windowed model's blocks behind the window go back to the pool, the
block table keeps its length, prefix hits and preemption stay correct, and nothing leaks.

The scheduler-level tests use the fake runner with a windowed 'model': a sampled token depends only
on the last WINDOW tokens read back from their KV slots (and the context length), so a block freed
while still inside some query's window, and reused by another request, changes the token stream.
"""
from __future__ import annotations

import random

import pytest

from sluice.config import CacheConfig, SchedulerConfig
from sluice.core.kv_cache_manager import KVCacheManager
from sluice.core.scheduler import Scheduler
from sluice.core.sliding_window_manager import NULL_BLOCK, SlidingWindowKVCacheManager, make_kv_cache_manager
from tests.core.fakes import (FakeRunner, _RunnerRequest, hashed_next_token, make_request, reference_output,
                              run_step)

BLOCK_SIZE = 4
WINDOW = 6
# Live blocks of a decoding request: positions num_computed - W + 1 .. num_computed fall in at most
# cdiv(W, block_size) + 1 blocks.
MAX_LIVE_BLOCKS = -(-WINDOW // BLOCK_SIZE) + 1


def windowed_next_token(req_id: str, context: list[int]) -> int:
    return hashed_next_token(req_id, [len(context)] + context[-WINDOW:])


class WindowedRunner(FakeRunner):
    """Reads back only the window of the last position: blocks before it may hold anything."""

    def _read_context(self, state: _RunnerRequest) -> list[int]:
        first = max(0, state.num_computed_tokens - WINDOW)
        context: list[int] = [-1] * first  # never looked at: windowed_next_token takes the last WINDOW
        for pos in range(first, state.num_computed_tokens):
            block_id, offset = self._slot(state, pos)
            slot = self.kv[block_id][offset]
            assert slot is not None and slot[0] == pos, f"slot of position {pos} holds {slot}"
            context.append(slot[1])
        return context


def test_make_kv_cache_manager_picks_the_windowed_manager_only_with_a_window():
    assert type(make_kv_cache_manager(8, BLOCK_SIZE, True, None)) is KVCacheManager
    assert isinstance(make_kv_cache_manager(8, BLOCK_SIZE, True, WINDOW), SlidingWindowKVCacheManager)


def test_blocks_behind_the_window_are_freed_while_the_context_grows():
    manager = SlidingWindowKVCacheManager(num_blocks=8, block_size=BLOCK_SIZE, sliding_window=WINDOW)
    request = make_request("a", list(range(5)), max_tokens=None)
    assert manager.allocate_slots(request, 5) is not None
    request.num_computed_tokens = 5
    for step in range(60):  # 60 decode steps: 15 blocks of context in a pool of 8
        request.append_output_token_ids([1000 + step])
        assert manager.allocate_slots(request, 1) is not None
        request.num_computed_tokens += 1
        live = manager.num_live_blocks("a")
        assert live <= MAX_LIVE_BLOCKS
        assert manager.num_free_blocks == 8 - live
    block_ids = manager.get_block_ids("a")
    assert len(block_ids) == -(-request.num_computed_tokens // BLOCK_SIZE)  # one entry per block of positions
    first_live = (request.num_computed_tokens - WINDOW) // BLOCK_SIZE
    assert all(b is NULL_BLOCK for b in manager.req_to_blocks["a"][:first_live])
    manager.free(request)
    manager.block_pool.check_all_free()


def test_a_prefix_hit_beyond_the_window_frees_the_dead_hits_at_once():
    manager = SlidingWindowKVCacheManager(num_blocks=16, block_size=BLOCK_SIZE, sliding_window=WINDOW)
    prompt = list(range(100, 130))
    first = make_request("a", prompt)
    manager.allocate_slots(first, 30)
    first.num_computed_tokens = 30
    manager.free(first)
    second = make_request("b", prompt + [7])
    hits, num_computed = manager.get_computed_blocks(second)
    assert num_computed == 28  # every full block is still cached: freed blocks keep their hash
    assert manager.allocate_slots(second, 3, hits) is not None
    assert manager.num_live_blocks("b") <= MAX_LIVE_BLOCKS
    second.num_computed_tokens = 31
    manager.free(second)
    manager.block_pool.check_all_free()


def test_a_prefix_hit_as_long_as_the_pool_takes_only_the_window():
    """Hits behind the window are never revived, so a cached prefix filling the pool still admits."""
    manager = SlidingWindowKVCacheManager(num_blocks=12, block_size=BLOCK_SIZE, sliding_window=WINDOW)
    prompt = list(range(100, 148))  # 12 blocks: the whole pool
    first = make_request("a", prompt, max_tokens=None)
    manager.allocate_slots(first, 8)
    for num_computed in range(8, 48, 8):
        first.num_computed_tokens = num_computed
        assert manager.allocate_slots(first, 8) is not None
    first.num_computed_tokens = 48
    manager.free(first)
    assert len(manager.block_pool.cached_block_hash_to_block) == 12
    second = make_request("b", prompt + [1, 2, 3])
    hits, num_computed = manager.get_computed_blocks(second)
    assert num_computed == 48
    assert manager.allocate_slots(second, 3, hits) is not None
    assert manager.num_live_blocks("b") <= MAX_LIVE_BLOCKS
    assert manager.get_block_ids("b")[:10] == [NULL_BLOCK.block_id] * 10
    second.num_computed_tokens = 51
    manager.free(second)
    manager.block_pool.check_all_free()


def _scheduler(num_blocks: int, enable_prefix_caching: bool, budget: int = 16) -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget, max_model_len=256),
        CacheConfig(block_size=BLOCK_SIZE, enable_prefix_caching=enable_prefix_caching, num_blocks=num_blocks,
                    sliding_window=WINDOW))


@pytest.mark.parametrize("num_blocks,prefix_caching", [(64, True), (64, False), (9, True), (9, False)])
def test_windowed_runs_match_the_reference_and_stay_bounded(num_blocks, prefix_caching):
    """Prompts far longer than the window, shared prefixes, chunked prefill; 9 blocks force preemption."""
    rng = random.Random(num_blocks)
    shared = [rng.randrange(VOCAB) for _ in range(40)]
    prompts = [[rng.randrange(VOCAB) for _ in range(n)] for n in (3, 30, 57)]
    prompts += [shared + [rng.randrange(VOCAB) for _ in range(k)] for k in (1, 5, 13)]
    scheduler = _scheduler(num_blocks, prefix_caching)
    for round_ in range(2):  # the second round hits blocks the first one freed (prefix caching on)
        runner = WindowedRunner.for_scheduler(scheduler, windowed_next_token)
        for i, prompt in enumerate(prompts):
            scheduler.add_request(make_request(f"{round_}-{i}", prompt, max_tokens=30))
        tokens: dict[str, list[int]] = {}
        while scheduler.has_unfinished_requests():
            _, outputs = run_step(scheduler, runner)
            for out in outputs:
                tokens.setdefault(out.req_id, []).extend(out.new_token_ids)
            manager = scheduler.kv_cache_manager
            for request in scheduler.running:
                # decodes hold the window's blocks; a prompt chunk of up to 16 tokens adds its own
                assert manager.num_live_blocks(request.request_id) <= MAX_LIVE_BLOCKS + 16 // BLOCK_SIZE
        for i, prompt in enumerate(prompts):
            assert tokens[f"{round_}-{i}"] == reference_output(prompt, 30, windowed_next_token), f"prompt {i}"
        scheduler.kv_cache_manager.block_pool.check_all_free()
    if num_blocks == 9:
        assert scheduler.num_preemptions > 0


VOCAB = 1000
