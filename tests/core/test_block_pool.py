"""BlockPool and FreeBlockQueue: reference counts, LRU free order, the hash -> block map."""
from __future__ import annotations

import pytest

from sluice.core.block_pool import BlockPool, FreeBlockQueue, KVBlock


def _ids(blocks) -> list[int]:
    return [block.block_id for block in blocks]


def test_free_queue_pops_in_append_order_and_removes_from_the_middle():
    blocks = [KVBlock(i) for i in range(5)]
    queue = FreeBlockQueue(blocks)
    queue.remove(blocks[2])
    assert _ids(queue) == [0, 1, 3, 4]
    assert queue.popleft() is blocks[0]
    queue.append(blocks[2])
    assert _ids(queue) == [1, 3, 4, 2]
    assert len(queue) == 4


def test_free_queue_rejects_double_append_and_removing_an_absent_block():
    blocks = [KVBlock(0), KVBlock(1)]
    queue = FreeBlockQueue(blocks)
    with pytest.raises(ValueError, match="already in the free queue"):
        queue.append(blocks[0])
    queue.remove(blocks[1])
    with pytest.raises(ValueError, match="not in the free queue"):
        queue.remove(blocks[1])


def test_free_queue_popleft_on_empty_queue_raises():
    queue = FreeBlockQueue([])
    with pytest.raises(ValueError, match="no free blocks"):
        queue.popleft()


def test_new_blocks_come_from_the_lru_head_with_one_reference():
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(3)
    assert _ids(blocks) == [0, 1, 2]
    assert all(block.ref_cnt == 1 for block in blocks)
    assert pool.num_free_blocks == 1
    assert pool.usage == pytest.approx(0.75)


def test_allocating_more_blocks_than_are_free_raises_and_takes_nothing():
    pool = BlockPool(2)
    with pytest.raises(ValueError, match="only 2 are free"):
        pool.get_new_blocks(3)
    assert pool.num_free_blocks == 2


def test_freed_blocks_join_the_tail_in_the_given_order():
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(4)
    pool.free_blocks([blocks[3], blocks[1]])
    pool.free_blocks([blocks[0], blocks[2]])
    assert _ids(pool.free_block_queue) == [3, 1, 0, 2]
    assert _ids(pool.get_new_blocks(2)) == [3, 1]


def test_reusing_a_cached_block_evicts_its_hash():
    pool = BlockPool(2)
    block, other = pool.get_new_blocks(2)
    pool.cache_full_block(block, block_hash=111)
    pool.free_blocks([block, other])
    assert pool.get_cached_block(111) is block  # free but still cached
    assert pool.get_new_blocks(1) == [block]
    assert pool.get_cached_block(111) is None
    assert block.block_hash is None


def test_touch_revives_a_free_cached_block_out_of_the_queue_and_counts_references():
    pool = BlockPool(3)
    block = pool.get_new_blocks(1)[0]
    pool.cache_full_block(block, block_hash=7)
    pool.free_blocks([block])
    pool.touch([block])
    assert block.ref_cnt == 1
    assert block not in list(pool.free_block_queue)
    pool.touch([block])  # a second request shares it
    assert block.ref_cnt == 2
    pool.free_blocks([block])
    assert pool.num_free_blocks == 2  # still held by one request
    pool.free_blocks([block])
    assert pool.num_free_blocks == 3


def test_a_hash_already_cached_is_not_taken_by_a_duplicate_block():
    pool = BlockPool(2)
    first, duplicate = pool.get_new_blocks(2)
    pool.cache_full_block(first, 5)
    pool.cache_full_block(duplicate, 5)
    assert pool.get_cached_block(5) is first
    assert duplicate.block_hash is None


def test_freeing_a_block_twice_raises():
    pool = BlockPool(1)
    block = pool.get_new_blocks(1)[0]
    pool.free_blocks([block])
    with pytest.raises(ValueError, match="freed more often"):
        pool.free_blocks([block])


def test_reset_prefix_cache_forgets_every_hash():
    pool = BlockPool(2)
    in_use, freed = pool.get_new_blocks(2)
    pool.cache_full_block(in_use, 1)
    pool.cache_full_block(freed, 2)
    pool.free_blocks([freed])
    pool.reset_prefix_cache()
    assert pool.get_cached_block(1) is None and pool.get_cached_block(2) is None
    assert in_use.ref_cnt == 1


def test_check_all_free_reports_leaked_blocks():
    pool = BlockPool(3)
    pool.check_all_free()
    leaked = pool.get_new_blocks(1)
    with pytest.raises(AssertionError, match=r"still referenced: \[0\]"):
        pool.check_all_free()
    pool.free_blocks(leaked)
    pool.check_all_free()


def test_pool_needs_at_least_one_block():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0)
