"""KV block residency timings (``--kv-cache-metrics``): lifetime, idle time before eviction, reuse gap.

Off by default; switched on by swapping the scheduler's BlockPool for ``TimedBlockPool``, so that a
server without the flag runs the plain pool and pays nothing. Only a sample of blocks is timed
(``--kv-cache-metrics-sample``, vLLM's default 1 %): the choice is made when a block is allocated,
and a timed block is followed until its cached contents are evicted.

    allocate (t0) -- use (touch, t1) -- free -- ... -- use (t2) -- free (t3) -- evict (t4)
    lifetime = t4 - t0     reuse gaps = t1 - t0, t2 - t1     idle before evict = t4 - t3

An eviction is the moment a free block that still held a prefix-cache hash is taken for new
contents (``BlockPool.get_new_blocks``); an empty block being reused is not one.
"""
from __future__ import annotations

import random
import time
from collections.abc import Iterable

from sluice.core.block_pool import BlockPool, KVBlock
from sluice.stats import KVCacheEvents

# Events kept between two reports at most: an engine whose stats nobody reads (offline, no loggers)
# must not grow without bound.
MAX_PENDING_EVENTS = 10_000


class TimedBlockPool(BlockPool):
    """A BlockPool that times a sample of its blocks; ``drain_events`` hands the timings over."""

    def __init__(self, num_blocks: int, sample_rate: float, seed: int = 0) -> None:
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"kv_cache_metrics_sample must be in (0, 1], got {sample_rate}")
        super().__init__(num_blocks)
        self.sample_rate = sample_rate
        self._rng = random.Random(seed)
        # block_id -> [allocated at, last used at]; only sampled blocks.
        self._timed: dict[int, list[float]] = {}
        self._events = KVCacheEvents()

    @classmethod
    def replacing(cls, pool: BlockPool, sample_rate: float) -> "TimedBlockPool":
        """A timed pool of the same size, for a pool that has not handed out any block yet."""
        if pool.num_free_blocks != pool.num_blocks:
            raise ValueError("the KV block pool can only be timed before any block is allocated")
        return cls(pool.num_blocks, sample_rate)

    def get_new_blocks(self, num_blocks: int) -> list[KVBlock]:
        now = time.monotonic()
        for block in self._peek_free(num_blocks):
            times = self._timed.pop(block.block_id, None)
            if times is not None and block.block_hash is not None:  # cached contents go: an eviction
                self._add(self._events.lifetimes, now - times[0])
                self._add(self._events.idle_before_evict, now - times[1])
        blocks = super().get_new_blocks(num_blocks)
        for block in blocks:
            if self._rng.random() < self.sample_rate:
                self._timed[block.block_id] = [now, now]
        return blocks

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        blocks = list(blocks)
        now = time.monotonic()
        for block in blocks:
            times = self._timed.get(block.block_id)
            if times is not None:
                self._add(self._events.reuse_gaps, now - times[1])
                times[1] = now
        super().touch(blocks)

    def free_blocks(self, ordered_blocks: Iterable[KVBlock]) -> None:
        ordered_blocks = list(ordered_blocks)
        now = time.monotonic()
        for block in ordered_blocks:
            times = self._timed.get(block.block_id)
            if times is not None and block.ref_cnt == 1:
                times[1] = now  # its last user lets go: idle from here
        super().free_blocks(ordered_blocks)

    def drain_events(self) -> KVCacheEvents:
        events, self._events = self._events, KVCacheEvents()
        return events

    def _peek_free(self, num_blocks: int) -> list[KVBlock]:
        """The blocks the next ``get_new_blocks(num_blocks)`` will take, LRU head first."""
        out = []
        for block in self.free_block_queue:
            if len(out) == num_blocks:
                break
            out.append(block)
        return out

    @staticmethod
    def _add(values: list[float], value: float) -> None:
        if len(values) < MAX_PENDING_EVENTS:
            values.append(value)


def install_kv_cache_metrics(scheduler, sample_rate: float) -> None:
    """Swaps the scheduler's block pool for a TimedBlockPool (before any request is added)."""
    manager = scheduler.kv_cache_manager
    manager.block_pool = TimedBlockPool.replacing(manager.block_pool, sample_rate)
    scheduler.kv_cache_events_source = manager.block_pool.drain_events
