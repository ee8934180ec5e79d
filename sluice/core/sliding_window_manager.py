"""KV cache manager for models whose every layer attends through a sliding window (Mistral, Phi-3 with
``sliding_window``): blocks that fell out of the window go back to the pool while the request runs,
so a request holds about ``sliding_window / block_size + 1`` blocks however long its context grows.

A query at position p sees positions p - W + 1 .. p (transformers' sliding-window mask). Once the
request has computed ``num_computed`` tokens, its next query sits at ``num_computed`` or later, so
every block wholly before position ``num_computed - W + 1`` is dead for good:

    W = 6, block_size = 4, num_computed = 13 (next query at 13 sees 8..13)
    positions:    0..3      4..7      8..11     12..15
    block_table: [ NULL   |  NULL   |   b7    |   b1   ]     dead blocks freed, table keeps its length

A dead entry becomes ``NULL_BLOCK`` (id 0, owned by no one): the table keeps one entry per position
range, and the attention backends never read blocks before a query's window, so whatever id 0 holds
is never seen. Freed blocks keep their hash in the LRU free queue like any freed block: their KV is
intact until reused, so prefix lookups (which need every block from the start) stay correct.
Models mixing windowed and full-attention layers (Gemma 2/3) use one of these per windowed layer group
(core/hybrid_kv_manager.py); the scheduler builds this class alone only for models whose every layer is
windowed, so others pay nothing.
"""
from __future__ import annotations

from sluice.core.block_pool import KVBlock
from sluice.core.kv_cache_manager import KVCacheManager
from sluice.core.request import Request

# Stands for a freed entry of a block table; never in the pool, never freed, never hashed.
NULL_BLOCK = KVBlock(block_id=0)


class SlidingWindowKVCacheManager(KVCacheManager):
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 sliding_window: int = 1) -> None:
        if sliding_window < 1:
            raise ValueError(f"sliding_window must be at least 1, got {sliding_window}")
        super().__init__(num_blocks, block_size, enable_prefix_caching)
        self.sliding_window = sliding_window
        # req_id -> how many leading entries of its block table are NULL_BLOCK.
        self.num_dead_blocks: dict[str, int] = {}

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: list[KVBlock] | None = None) -> list[int] | None:
        """As KVCacheManager.allocate_slots, after freeing the blocks behind the first new token's window
        (prefix hits behind it are never taken: their entries start as NULL_BLOCK, see _hits_to_hold)."""
        if request.request_id in self.req_to_blocks:
            self._free_dead_blocks(request.request_id, request.num_computed_tokens)
        return super().allocate_slots(request, num_new_tokens, new_computed_blocks)

    def _hits_to_hold(self, request: Request, hits: list[KVBlock], num_computed: int
                      ) -> tuple[list[KVBlock], list[KVBlock]]:
        if request.request_id in self.req_to_blocks:  # a running request: hits only come on the first allocation
            return hits, hits
        num_dead = min(self._num_dead(num_computed), len(hits))
        self.num_dead_blocks[request.request_id] = num_dead
        return [NULL_BLOCK] * num_dead + hits[num_dead:], hits[num_dead:]

    def _num_dead(self, num_computed: int) -> int:
        """Leading blocks that no query from position ``num_computed`` on can see."""
        return max(0, num_computed - self.sliding_window + 1) // self.block_size

    def _free_dead_blocks(self, req_id: str, num_computed: int) -> None:
        num_dead = self._num_dead(num_computed)
        num_freed = self.num_dead_blocks.get(req_id, 0)
        if num_dead <= num_freed:
            return
        blocks = self.req_to_blocks[req_id]
        dead = blocks[num_freed:num_dead]
        blocks[num_freed:num_dead] = [NULL_BLOCK] * len(dead)
        self.block_pool.free_blocks(reversed(dead))  # the deepest first: the shared beginning stays longest
        if not self.enable_prefix_caching:  # a sibling-shared block's hash goes with its last reference
            for block in dead:
                if block.ref_cnt == 0:
                    self.block_pool.evict_cached_block(block)
        self.num_dead_blocks[req_id] = num_dead
        # Dead blocks were full and computed, hence already published; never publish a NULL entry.
        self.num_cached_blocks[req_id] = max(self.num_cached_blocks[req_id], num_dead)

    def can_swap(self, request: Request) -> bool:
        return not self.num_dead_blocks.get(request.request_id)  # freed entries hold no KV to copy

    def free(self, request: Request) -> None:
        num_dead = self.num_dead_blocks.pop(request.request_id, 0)
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self.num_cached_blocks.pop(request.request_id, None)
        self._release(blocks[num_dead:], max(0, request.num_computed_tokens // self.block_size - num_dead))

    def num_live_blocks(self, req_id: str) -> int:
        """Blocks the request holds (its table's length less the freed entries)."""
        return len(self.req_to_blocks.get(req_id, ())) - self.num_dead_blocks.get(req_id, 0)


def make_kv_cache_manager(num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                          sliding_window: int | None = None) -> KVCacheManager:
    """The manager for a model: windowed (every layer) or plain."""
    if sliding_window is None:
        return KVCacheManager(num_blocks, block_size, enable_prefix_caching)
    return SlidingWindowKVCacheManager(num_blocks, block_size, enable_prefix_caching, sliding_window)
