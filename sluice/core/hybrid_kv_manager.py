"""KV cache management for models that mix sliding-window and global attention layers (Gemma 2, Gemma 3).

Layers are grouped by attention type, and every group has the same number of layers, so that one KV tensor
can serve one layer of each group (tensor k holds layer k of every group; a block id belongs to exactly one
group at a time). The groups draw their blocks from one shared pool, each request has one block table per
group, the global groups keep every block and the windowed groups free the blocks that fell out of their window
(as ``SlidingWindowKVCacheManager`` does for models whose every layer is windowed):

    Gemma 2 shape, 4 layers [W, G, W, G], W = 8, block_size 4, a request at 20 computed tokens
    groups:        0 = global  (layers 1, 3)       1 = window 8 (layers 0, 2)
    KV tensors:    tensor 0 serves layers 1 and 0, tensor 1 serves layers 3 and 2
    block tables:  group 0: [b1 b4 b6 b2 b9]       group 1: [NULL NULL NULL b3 b7]  (positions 12..19 in window)
    one block = block_size tokens x 2 layers (the group size), half of a plain block (4 layers)

Groups of one attention type bigger than the smallest type are split into groups of that size (Gemma 3's five
windowed layers to one global become five windowed groups of one layer each); the last may be smaller, and its
tensors' spare layers go unused. Every group of a request holds blocks for the same positions, so the
footprint of a request of T tokens is ``num_global_groups x cdiv(T, block_size)`` plus, per windowed group,
at most ``windowed_request_blocks`` blocks, each block ``group_size`` layers deep.

Prefix caching: each group publishes its full blocks under the request's block hashes keyed by the group,
so equal hashes in two groups never meet in the pool. A hit is the longest prefix that every group finds; the
windowed groups' blocks behind the hit's window become NULL entries without a reference (their KV is never read),
so a windowed block freed into the LRU queue still serves a later hit as long as it is not reused.
Swap preemption is refused (``can_swap`` is False), so a preempted hybrid request recomputes.
"""
from __future__ import annotations

import hashlib

from sluice.core.block_pool import BlockPool, KVBlock
from sluice.core.kv_cache_manager import KVCacheManager, PrefixCacheStats, _cdiv
from sluice.core.kv_layer_groups import KVLayerGroup
from sluice.core.request import Request
from sluice.core.sliding_window_manager import SlidingWindowKVCacheManager


class _GroupPool:
    """The shared pool as one group sees it: its hashes are keyed by the group, everything else passes through."""

    def __init__(self, pool: BlockPool, group_index: int) -> None:
        self._pool = pool
        self._salt = int.from_bytes(hashlib.sha256(f"kv-group-{group_index}".encode()).digest()[:16], "little")

    def get_cached_block(self, block_hash: int) -> KVBlock | None:
        return self._pool.get_cached_block(block_hash ^ self._salt)

    def cache_full_block(self, block: KVBlock, block_hash: int) -> None:
        self._pool.cache_full_block(block, block_hash ^ self._salt)

    def __getattr__(self, name: str):
        return getattr(self._pool, name)


class HybridKVCacheManager:
    """One block table per layer group and request, over one pool; the scheduler-facing calls of
    KVCacheManager, with per-group block ids (a list per group, in ``groups`` order)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool,
                 groups: list[KVLayerGroup]) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.groups = groups
        self.block_pool = BlockPool(num_blocks)
        self.prefix_cache_stats = PrefixCacheStats()
        self.managers: list[KVCacheManager] = []
        for i, group in enumerate(groups):
            manager = (KVCacheManager(1, block_size, enable_prefix_caching) if group.sliding_window is None else
                       SlidingWindowKVCacheManager(1, block_size, enable_prefix_caching, group.sliding_window))
            manager.block_pool = _GroupPool(self.block_pool, i)  # type: ignore[assignment]
            self.managers.append(manager)

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.block_pool.usage

    def get_block_ids(self, req_id: str) -> list[list[int]]:
        return [manager.get_block_ids(req_id) for manager in self.managers]

    def get_computed_blocks(self, request: Request) -> tuple[list[list[KVBlock]], int]:
        """The longest prefix every group finds cached: each group's hit blocks for it, and its tokens."""
        hits = [manager.get_computed_blocks(request)[0] for manager in self.managers]
        num_blocks = min(len(h) for h in hits)
        return [h[:num_blocks] for h in hits], num_blocks * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: list[list[KVBlock]] | None = None) -> list[list[int]] | None:
        """Every group's table grows by ``num_new_tokens`` slots, or none does (None: the pool is short)."""
        if num_new_tokens < 1:
            raise ValueError(f"num_new_tokens must be at least 1, got {num_new_tokens}")
        hits = new_computed_blocks or [[] for _ in self.managers]
        running = request.request_id in self.managers[0].req_to_blocks
        for manager in self.managers:
            if running and isinstance(manager, SlidingWindowKVCacheManager):
                manager._free_dead_blocks(request.request_id, request.num_computed_tokens)
        needed = sum(self._blocks_needed(manager, request, num_new_tokens, group_hits)
                     for manager, group_hits in zip(self.managers, hits))
        if needed > self.block_pool.num_free_blocks:
            if not running:
                for manager in self.managers:  # _hits_to_hold recorded dead entries for a table never made
                    if isinstance(manager, SlidingWindowKVCacheManager):
                        manager.num_dead_blocks.pop(request.request_id, None)
            return None
        new_ids = [manager.allocate_slots(request, num_new_tokens, group_hits)
                   for manager, group_hits in zip(self.managers, hits)]
        if not running and self.enable_prefix_caching:
            self.prefix_cache_stats.queries += request.num_tokens
            self.prefix_cache_stats.hits += len(hits[0]) * self.block_size
        return new_ids  # type: ignore[return-value]

    def _blocks_needed(self, manager: KVCacheManager, request: Request, num_new_tokens: int,
                       hits: list[KVBlock]) -> int:
        """Free blocks ``manager.allocate_slots`` takes: new ones plus cached hits it revives."""
        req_blocks = manager.req_to_blocks.get(request.request_id, [])
        num_computed = request.num_computed_tokens + len(hits) * self.block_size
        num_new = max(0, _cdiv(num_computed + num_new_tokens, self.block_size) - len(req_blocks) - len(hits))
        if not hits:
            return num_new
        _, held = manager._hits_to_hold(request, hits, num_computed)
        return num_new + sum(1 for block in held if block.ref_cnt == 0)

    def can_swap(self, request: Request) -> bool:
        return False  # swap copies one block table; a preempted hybrid request recomputes

    def free(self, request: Request) -> None:
        for manager in reversed(self.managers):  # windowed groups first: global blocks stay cached longest
            manager.free(request)

    def num_live_blocks(self, req_id: str) -> list[int]:
        """Blocks the request holds in each group (freed window entries not counted)."""
        return [len(manager.req_to_blocks.get(req_id, ())) - getattr(manager, "num_dead_blocks", {}).get(req_id, 0)
                for manager in self.managers]

    def reset_prefix_cache(self) -> None:
        self.block_pool.reset_prefix_cache()
