"""BlockPool: owns every KV block, its reference count, and the prefix-cache map.

A block is in exactly one of three states:

    in use          ref_cnt > 0, not in the free queue (maybe hashed: shared by requests)
    free, cached    ref_cnt == 0, in the free queue, hashed: a prefix hit can revive it
    free, empty     ref_cnt == 0, in the free queue, no hash

The free queue is an intrusive doubly linked list in LRU order, so a prefix hit can
pull a cached block out of the middle in O(1), and allocation evicts from the head:

    head <-> [b5 h=0x3a] <-> [b2] <-> [b9 h=0x7c] <-> tail
             ^ least recently freed: reused (and its hash evicted) first

Freeing appends at the tail; the KV cache manager frees a request's blocks tail
first, so the end of a prompt is evicted before its shared beginning.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass


@dataclass(slots=True, eq=False)
class KVBlock:
    """One block of ``block_size`` KV slots. ``eq=False``: blocks compare by identity."""
    block_id: int
    ref_cnt: int = 0
    # Hash of the full block's token chain while it is in the prefix cache, else None.
    block_hash: int | None = None
    # Free-list links; both None while the block is not in the free queue.
    prev_free_block: KVBlock | None = None
    next_free_block: KVBlock | None = None

    # Not the generated repr: that one would walk the whole free list through the links.
    def __repr__(self) -> str:
        return f"KVBlock(id={self.block_id}, ref_cnt={self.ref_cnt}, hash={self.block_hash})"


class FreeBlockQueue:
    """Free blocks in LRU order: O(1) popleft, append and removal from the middle.

    Two sentinel blocks bracket the list so that linking never special-cases the ends.
    """

    def __init__(self, blocks: Iterable[KVBlock]) -> None:
        self._head = KVBlock(block_id=-1)
        self._tail = KVBlock(block_id=-1)
        self._head.next_free_block = self._tail
        self._tail.prev_free_block = self._head
        self.num_free_blocks = 0
        for block in blocks:
            self.append(block)

    def popleft(self) -> KVBlock:
        block = self._head.next_free_block
        if block is self._tail or block is None:
            raise ValueError("no free blocks left")
        self.remove(block)
        return block

    def remove(self, block: KVBlock) -> None:
        prev, nxt = block.prev_free_block, block.next_free_block
        if prev is None or nxt is None:
            raise ValueError(f"block {block.block_id} is not in the free queue")
        prev.next_free_block = nxt
        nxt.prev_free_block = prev
        block.prev_free_block = block.next_free_block = None
        self.num_free_blocks -= 1

    def append(self, block: KVBlock) -> None:
        if block.prev_free_block is not None or block.next_free_block is not None:
            raise ValueError(f"block {block.block_id} is already in the free queue")
        last = self._tail.prev_free_block
        assert last is not None
        last.next_free_block = block
        block.prev_free_block = last
        block.next_free_block = self._tail
        self._tail.prev_free_block = block
        self.num_free_blocks += 1

    def __iter__(self) -> Iterator[KVBlock]:
        """Head (next to be reused) to tail (most recently freed)."""
        block = self._head.next_free_block
        while block is not None and block is not self._tail:
            yield block
            block = block.next_free_block

    def __len__(self) -> int:
        return self.num_free_blocks


class BlockPool:
    """All ``num_blocks`` blocks, the LRU free queue, and ``block_hash -> block`` for cached full blocks."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.blocks = [KVBlock(block_id=i) for i in range(num_blocks)]
        self.free_block_queue = FreeBlockQueue(self.blocks)
        # One block per hash: a duplicate full block computed by a concurrent request stays unhashed.
        self.cached_block_hash_to_block: dict[int, KVBlock] = {}
        # The host prefix tier (core/kv_offload.py), when on: sees each cached block before its reuse evicts it.
        self.on_evict: Callable[[KVBlock], None] | None = None

    @property
    def num_free_blocks(self) -> int:
        return self.free_block_queue.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some request (cached free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def get_cached_block(self, block_hash: int) -> KVBlock | None:
        return self.cached_block_hash_to_block.get(block_hash)

    def get_new_blocks(self, num_blocks: int) -> list[KVBlock]:
        """Takes ``num_blocks`` from the LRU head, evicting their cached hashes; ref_cnt becomes 1."""
        if num_blocks > self.num_free_blocks:
            raise ValueError(f"cannot allocate {num_blocks} blocks, only {self.num_free_blocks} are free")
        blocks = []
        for _ in range(num_blocks):
            block = self.free_block_queue.popleft()
            if self.on_evict is not None and block.block_hash is not None:
                self.on_evict(block)
            self.evict_cached_block(block)
            block.ref_cnt = 1
            blocks.append(block)
        return blocks

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Takes a reference on prefix-hit blocks, reviving free ones out of the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_block_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVBlock]) -> None:
        """Drops one reference each; blocks reaching zero join the free queue in the given order."""
        for block in ordered_blocks:
            if block.ref_cnt <= 0:
                raise ValueError(f"block {block.block_id} freed more often than it was allocated")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_block_queue.append(block)

    def cache_full_block(self, block: KVBlock, block_hash: int) -> None:
        """Registers a full block under its hash, unless it is cached already or the hash is taken."""
        if block.block_hash is None and block_hash not in self.cached_block_hash_to_block:
            block.block_hash = block_hash
            self.cached_block_hash_to_block[block_hash] = block

    def evict_cached_block(self, block: KVBlock) -> None:
        """Forgets a block's hash, so no later prefix lookup finds it."""
        if block.block_hash is None:
            return
        if self.cached_block_hash_to_block.get(block.block_hash) is block:
            del self.cached_block_hash_to_block[block.block_hash]
        block.block_hash = None

    def reset_prefix_cache(self) -> None:
        """Forgets every cached hash; blocks in use keep their contents and references."""
        for block in self.blocks:
            block.block_hash = None
        self.cached_block_hash_to_block.clear()

    def check_all_free(self) -> None:
        """Raises AssertionError unless every block is unreferenced and in the free queue.

        The block-leak invariant: after all requests finish or abort, this must hold.
        """
        referenced = [b.block_id for b in self.blocks if b.ref_cnt != 0]
        if referenced:
            raise AssertionError(f"blocks still referenced: {referenced}")
        queued = sum(1 for _ in self.free_block_queue)
        if queued != self.num_blocks or self.num_free_blocks != self.num_blocks:
            raise AssertionError(f"free queue holds {queued} blocks (counted {self.num_free_blocks}), "
                                 f"pool has {self.num_blocks}")
