"""HybridKVCacheManager: models mixing windowed and global layers keep one block table per layer group over
one pool; the windowed groups free blocks behind their window, the global groups keep all, prefix hits need
every group, allocation is all-or-nothing across groups, and nothing leaks."""
from __future__ import annotations

import random

from sluice.config import hybrid_request_blocks
from sluice.core.hybrid_kv_manager import HybridKVCacheManager
from sluice.core.kv_layer_groups import (KVLayerGroup, is_hybrid,
                                         kv_layer_groups)
from sluice.core.sliding_window_manager import NULL_BLOCK
from tests.core.fakes import make_request

BLOCK_SIZE = 4
WINDOW = 6
MAX_LIVE_WINDOW_BLOCKS = -(-WINDOW // BLOCK_SIZE) + 1
GEMMA2_WINDOWS = [WINDOW, None, WINDOW, None]  # alternating, as Gemma 2
GEMMA3_WINDOWS = [WINDOW] * 5 + [None] + [WINDOW] * 2  # five windowed to one global, as Gemma 3


def _manager(num_blocks: int, windows=GEMMA2_WINDOWS, prefix_caching: bool = True) -> HybridKVCacheManager:
    return HybridKVCacheManager(num_blocks, BLOCK_SIZE, prefix_caching, kv_layer_groups(windows))


def _check_all_free(manager: HybridKVCacheManager) -> None:
    manager.block_pool.check_all_free()
    assert all(not m.req_to_blocks for m in manager.managers)


def test_only_models_mixing_windowed_and_global_layers_are_hybrid():
    assert is_hybrid(GEMMA2_WINDOWS) and is_hybrid(GEMMA3_WINDOWS)
    assert not is_hybrid([None] * 4) and not is_hybrid([WINDOW] * 4)


def test_layers_are_grouped_by_type_in_groups_of_the_smallest_type():
    assert kv_layer_groups(GEMMA2_WINDOWS) == [KVLayerGroup(None, (1, 3)), KVLayerGroup(WINDOW, (0, 2))]
    assert kv_layer_groups(GEMMA3_WINDOWS) == [KVLayerGroup(None, (5,))] + [
        KVLayerGroup(WINDOW, (layer,)) for layer in (0, 1, 2, 3, 4, 6, 7)]
    assert kv_layer_groups([8, None, 8, None, 8, 8, None, 8]) == [
        KVLayerGroup(None, (1, 3, 6)), KVLayerGroup(8, (0, 2, 4)), KVLayerGroup(8, (5, 7))]


def test_windowed_group_stays_bounded_while_the_global_group_keeps_every_block():
    manager = _manager(64)
    request = make_request("a", list(range(5)), max_tokens=None)
    assert manager.allocate_slots(request, 5) is not None
    request.num_computed_tokens = 5
    for step in range(80):
        request.append_output_token_ids([1000 + step])
        assert manager.allocate_slots(request, 1) is not None
        request.num_computed_tokens += 1
        global_live, window_live = manager.num_live_blocks("a")
        assert global_live == -(-request.num_computed_tokens // BLOCK_SIZE)
        assert window_live <= MAX_LIVE_WINDOW_BLOCKS
        assert manager.num_free_blocks == 64 - global_live - window_live
    global_ids, window_ids = manager.get_block_ids("a")
    global_table, window_table = (m.req_to_blocks["a"] for m in manager.managers)
    assert len(global_ids) == len(window_ids) and NULL_BLOCK not in global_table
    live_window = {block.block_id for block in window_table if block is not NULL_BLOCK}
    assert not set(global_ids) & live_window  # a block belongs to one group
    manager.free(request)
    _check_all_free(manager)


def test_a_prefix_hit_needs_every_group_and_revives_only_the_window():
    manager = _manager(64, GEMMA3_WINDOWS)
    prompt = list(range(100, 130))
    first = make_request("a", prompt)
    assert manager.allocate_slots(first, 30) is not None
    first.num_computed_tokens = 30
    manager.free(first)
    second = make_request("b", prompt + [7])
    hits, num_computed = manager.get_computed_blocks(second)
    assert num_computed == 28 and all(len(h) == 7 for h in hits)
    assert manager.allocate_slots(second, 3, hits) is not None
    assert manager.prefix_cache_stats.hits == 28
    live = manager.num_live_blocks("b")
    assert live[0] == 8 and all(n <= MAX_LIVE_WINDOW_BLOCKS for n in live[1:])
    second.num_computed_tokens = 31
    manager.free(second)
    _check_all_free(manager)


def test_a_windowed_block_reused_by_another_request_ends_the_hit_there():
    manager = _manager(16)
    prompt = list(range(100, 124))  # 6 blocks
    first = make_request("a", prompt, max_tokens=None)
    for start in range(0, 24, 4):  # chunks of one block: window blocks go back to the free queue as it runs
        first.num_computed_tokens = start
        assert manager.allocate_slots(first, 4) is not None
    first.num_computed_tokens = 24
    assert manager.managers[1].req_to_blocks["a"][0] is NULL_BLOCK  # freed into the queue, hash kept
    taken = manager.block_pool.get_new_blocks(manager.num_free_blocks)  # reuse evicts the freed window blocks
    manager.free(first)
    assert manager.get_computed_blocks(make_request("b", prompt + [1])) == ([[], []], 0)  # global blocks alone miss
    manager.block_pool.free_blocks(taken)
    _check_all_free(manager)


def test_allocation_is_all_or_nothing_across_groups():
    manager = _manager(5)
    request = make_request("a", list(range(12)))
    assert manager.allocate_slots(request, 12) is None  # 3 global + 3 window blocks > 5
    assert manager.num_free_blocks == 5 and not manager.managers[0].req_to_blocks
    assert manager.allocate_slots(request, 8) is not None  # 2 + 2
    assert manager.num_free_blocks == 1
    manager.free(request)
    _check_all_free(manager)


def test_random_workload_never_leaks_and_never_shares_a_block_across_groups():
    rng = random.Random(0)
    for prefix_caching in (True, False):
        manager = _manager(48, GEMMA3_WINDOWS, prefix_caching)
        running: dict[str, object] = {}
        shared = [rng.randrange(50) for _ in range(16)]
        for i in range(200):
            if len(running) < 4:
                prompt = (shared if rng.random() < 0.5 else []) + [rng.randrange(50) for _ in range(rng.randrange(1, 20))]
                request = make_request(f"r{i}", prompt, max_tokens=None)
                hits, num_hit = manager.get_computed_blocks(request)
                if manager.allocate_slots(request, request.num_tokens - num_hit, hits) is not None:
                    request.num_computed_tokens = request.num_tokens
                    running[request.request_id] = request
            for req_id, request in list(running.items()):
                request.append_output_token_ids([rng.randrange(50)])
                if manager.allocate_slots(request, 1) is None or rng.random() < 0.05:
                    manager.free(request)
                    del running[req_id]
                    continue
                request.num_computed_tokens += 1
            owners: dict[int, int] = {}
            for group, m in enumerate(manager.managers):
                for blocks in m.req_to_blocks.values():
                    for block in blocks:
                        if block is not NULL_BLOCK:
                            assert owners.setdefault(block.block_id, group) == group
        for request in running.values():
            manager.free(request)
        _check_all_free(manager)


def test_per_request_footprint_is_well_below_keeping_every_layer():
    groups = kv_layer_groups(GEMMA2_WINDOWS)
    # 4 layers keeping 1000 tokens: 250 blocks x 4 layers; hybrid: 250 + 4 blocks x 2 layers
    assert hybrid_request_blocks(1000, groups, 0, BLOCK_SIZE) == 250 + 3
    assert hybrid_request_blocks(1000, groups, 0, BLOCK_SIZE) * 2 < 250 * 4 * 0.55
