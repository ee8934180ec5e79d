"""KVCacheManager: block tables, prefix hits (with their cap and extra keys), LRU eviction, freeing."""
from __future__ import annotations

import pytest

from sluice.core.kv_cache_manager import KVCacheManager, hash_block_tokens, update_block_hashes
from tests.core.fakes import make_request

BLOCK_SIZE = 4


def _admit(manager: KVCacheManager, request, num_new_tokens: int | None = None) -> list[int] | None:
    """What the scheduler does for a waiting request: look up the prefix, then allocate the rest."""
    hits, num_computed = manager.get_computed_blocks(request)
    num_new_tokens = num_new_tokens or request.num_tokens - num_computed
    block_ids = manager.allocate_slots(request, num_new_tokens, hits)
    if block_ids is not None:
        request.num_computed_tokens = num_computed + num_new_tokens
    return block_ids


def test_allocation_grows_the_block_table_on_demand():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    request = make_request("a", list(range(6)))
    assert manager.allocate_slots(request, 6) == [0, 1]
    request.num_computed_tokens = 6
    assert manager.allocate_slots(request, 2) == []  # fits in block 1
    request.num_computed_tokens = 8
    assert manager.allocate_slots(request, 1) == [2]
    assert manager.get_block_ids("a") == [0, 1, 2]
    assert manager.num_free_blocks == 5


def test_allocation_that_does_not_fit_returns_none_and_takes_nothing():
    manager = KVCacheManager(num_blocks=2, block_size=BLOCK_SIZE)
    request = make_request("a", list(range(12)))
    assert manager.allocate_slots(request, 12) is None
    assert manager.num_free_blocks == 2
    assert manager.get_block_ids("a") == []


def test_allocating_zero_tokens_is_a_value_error():
    manager = KVCacheManager(num_blocks=2, block_size=BLOCK_SIZE)
    with pytest.raises(ValueError, match="num_new_tokens"):
        manager.allocate_slots(make_request("a", [1]), 0)


def test_a_second_request_with_the_same_prefix_reuses_its_full_blocks():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    first = make_request("a", list(range(10)))
    _admit(manager, first)
    second = make_request("b", list(range(10)) + [99])
    hits, num_computed = manager.get_computed_blocks(second)
    assert num_computed == 8  # two full blocks; the partial third block is never shared
    assert [b.block_id for b in hits] == manager.get_block_ids("a")[:2]
    assert manager.allocate_slots(second, 3, hits) == [3]
    assert [b.ref_cnt for b in hits] == [2, 2]


def test_prefix_hit_is_capped_one_token_short():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    prompt = list(range(8))
    first = make_request("a", prompt)
    _admit(manager, first)
    manager.free(first)
    # Both blocks are cached, but the last token must run to give logits: cap 7 -> 1 block.
    _, num_computed = manager.get_computed_blocks(make_request("b", prompt))
    assert num_computed == 4
    _, num_computed = manager.get_computed_blocks(make_request("c", prompt + [8]))
    assert num_computed == 8


def test_hits_stop_at_the_first_block_that_differs():
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE)
    prompt = list(range(16))
    _admit(manager, make_request("a", prompt + [0]))
    late_change = prompt[:10] + [77] + prompt[11:] + [0]  # third block differs
    _, num_computed = manager.get_computed_blocks(make_request("b", late_change))
    assert num_computed == 8


def test_blocks_after_a_differing_block_never_hit_even_with_equal_tokens():
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE)
    _admit(manager, make_request("a", [1, 1, 1, 1, 2, 2, 2, 2, 0]))
    # Block 1 holds the same tokens as a's block 1, but its parent differs: the chained hash differs.
    request = make_request("b", [9, 9, 9, 9, 2, 2, 2, 2, 0])
    update_block_hashes(request, BLOCK_SIZE)
    assert manager.block_pool.get_cached_block(request.block_hashes[1]) is None
    assert manager.get_computed_blocks(request)[1] == 0


def test_cache_salt_separates_identical_tokens():
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE)
    prompt = list(range(9))
    _admit(manager, make_request("a", prompt, cache_salt="tenant-1"))
    assert manager.get_computed_blocks(make_request("b", prompt, cache_salt="tenant-2"))[1] == 0
    assert manager.get_computed_blocks(make_request("c", prompt))[1] == 0
    assert manager.get_computed_blocks(make_request("d", prompt, cache_salt="tenant-1"))[1] == 8


def test_lora_id_separates_identical_tokens():
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE)
    prompt = list(range(9))
    lora_request = make_request("a", prompt)
    lora_request.lora_int_id = 3
    _admit(manager, lora_request)
    assert manager.get_computed_blocks(make_request("b", prompt))[1] == 0


def test_block_hashes_are_deterministic_chains_extended_as_the_request_grows():
    request = make_request("a", list(range(6)))
    update_block_hashes(request, BLOCK_SIZE)
    h0 = hash_block_tokens(None, (0, 1, 2, 3), None)
    assert request.block_hashes == [h0]
    request.append_output_token_ids([6, 7])
    update_block_hashes(request, BLOCK_SIZE)
    assert request.block_hashes == [h0, hash_block_tokens(h0, (4, 5, 6, 7), None)]


def test_only_blocks_whose_tokens_are_all_scheduled_enter_the_cache():
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE)
    prompt = list(range(13))
    _admit(manager, make_request("a", prompt, max_tokens=4), num_new_tokens=6)  # a chunk: 1.5 blocks
    assert manager.get_computed_blocks(make_request("b", prompt))[1] == 4


def test_freed_blocks_are_evicted_least_recently_freed_first_and_tail_before_head():
    manager = KVCacheManager(num_blocks=6, block_size=BLOCK_SIZE)
    old = make_request("old", list(range(100, 109)))  # blocks 0 1 2 (2 full)
    new = make_request("new", list(range(200, 209)))  # blocks 3 4 5 (2 full)
    _admit(manager, old)
    _admit(manager, new)
    manager.free(old)
    manager.free(new)
    # Queue: old's tail first, then its head, then new's blocks the same way.
    assert [b.block_id for b in manager.block_pool.free_block_queue] == [2, 1, 0, 5, 4, 3]
    # Reusing two blocks evicts old's partial tail and old's second block, keeping its first.
    _admit(manager, make_request("c", list(range(300, 305))))
    assert manager.get_computed_blocks(make_request("x", list(range(100, 109))))[1] == 4
    assert manager.get_computed_blocks(make_request("y", list(range(200, 209))))[1] == 8


def test_a_hit_on_a_free_cached_block_is_not_also_counted_as_free():
    manager = KVCacheManager(num_blocks=3, block_size=BLOCK_SIZE)
    first = make_request("a", list(range(9)))
    _admit(manager, first)
    manager.free(first)
    # b hits 2 free cached blocks and needs 2 more: only 1 block would remain after the hit.
    second = make_request("b", list(range(9)) + list(range(50, 58)))
    hits, num_computed = manager.get_computed_blocks(second)
    assert num_computed == 8
    assert manager.allocate_slots(second, 9, hits) is None
    assert manager.num_free_blocks == 3
    manager.block_pool.check_all_free()


def test_free_drops_hashes_of_blocks_whose_kv_was_never_computed():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    prompt = list(range(9))
    request = make_request("a", prompt)
    manager.allocate_slots(request, 9)  # scheduled, then preempted before the step ran
    manager.free(request)  # num_computed_tokens is still 0
    assert manager.get_computed_blocks(make_request("b", prompt))[1] == 0
    manager.block_pool.check_all_free()


def test_prefix_cache_stats_count_tokens_of_admitted_requests():
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE)
    _admit(manager, make_request("a", list(range(10))))
    _admit(manager, make_request("b", list(range(12))))
    assert (manager.prefix_cache_stats.queries, manager.prefix_cache_stats.hits) == (22, 8)


def test_without_prefix_caching_nothing_is_hashed_or_reused():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    first = make_request("a", list(range(9)))
    _admit(manager, first)
    second = make_request("b", list(range(9)))
    assert manager.get_computed_blocks(second) == ([], 0)
    assert first.block_hashes == [] and second.block_hashes == []
    assert manager.block_pool.cached_block_hash_to_block == {}
    assert manager.prefix_cache_stats.queries == 0


def test_reset_prefix_cache_makes_later_lookups_miss():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    first = make_request("a", list(range(9)))
    _admit(manager, first)
    manager.free(first)
    manager.reset_prefix_cache()
    assert manager.get_computed_blocks(make_request("b", list(range(9))))[1] == 0


def test_usage_counts_referenced_blocks_only():
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    request = make_request("a", list(range(8)))
    _admit(manager, request)
    assert manager.usage == pytest.approx(0.5)
    manager.free(request)
    assert manager.usage == 0.0


def test_block_hashes_span_prompt_and_output_tokens_alike():
    grown = make_request("a", [0, 1, 2])
    grown.append_output_token_ids([3, 4, 5, 6, 7])
    update_block_hashes(grown, BLOCK_SIZE)
    whole_prompt = make_request("b", list(range(8)))
    update_block_hashes(whole_prompt, BLOCK_SIZE)
    assert grown.block_hashes == whole_prompt.block_hashes


def test_prefix_hits_are_only_accepted_on_a_first_allocation():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    first = make_request("a", list(range(9)))
    _admit(manager, first)
    hits, _ = manager.get_computed_blocks(make_request("b", list(range(9))))
    with pytest.raises(ValueError, match="new_computed_blocks"):
        manager.allocate_slots(first, 1, hits)
