"""KVCacheManager: each request's block table, prefix-cache lookups, allocation and freeing.

A request's tokens fill its blocks in order; ``block_size`` = 4 here:

    tokens:       t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9
    block_table:  [    b3     |     b7      |  b1  ..]
    block_hashes: [ h0        | h1          ]          (full blocks only)
                    h0 = H(None, (t0..t3), extra)
                    h1 = H(h0,   (t4..t7), extra)

A block's hash chains its parent's, so equal hashes mean equal whole prefixes; the
extra keys (LoRA id, cache salt) keep identical tokens of different tenants apart.

Prefix hits walk the hashes from the first block and stop at the first miss. A hit
never covers the last token: the model must run at least one token to produce logits.

    prompt of 8 tokens, both blocks cached -> hit = 4 tokens (cap 7, rounded down to blocks)

The cache holds only blocks whose KV is written by the end of the current step:
blocks become hashed when allocate_slots sees them full of computed-or-scheduled tokens,
and ``free`` un-hashes blocks beyond ``num_computed_tokens`` (a request preempted after
being scheduled, before its KV was written).

Siblings share the prompt even with prefix caching off. The children of an ``n > 1``
request (``Request.parent_request_id``, set by the engine front) hash their full
prompt blocks with the parent id as an extra key, so they find each other's blocks and no
one else's; a block loses that hash when its last reference goes, so nothing outlives the
siblings (no caching across requests):

    n = 3, prompt of 10 tokens, block_size 4, prefix caching off:
      0_r: [b0 b1 | b2]     b0, b1: ref_cnt 3, hashed H(.., "r") while any child lives
      1_r: [b0 b1 | b5]     b2, b5, b7: each child's own partial block and outputs
      2_r: [b0 b1 | b7]
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from sluice.core.block_pool import BlockPool, KVBlock
from sluice.core.request import Request


@dataclass(slots=True)
class PrefixCacheStats:
    """Cumulative, in tokens: a query is a request admitted with a lookup; hits are the tokens found."""
    queries: int = 0
    hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


def hash_block_tokens(parent_hash: int | None, token_ids: tuple[int, ...],
                      extra_keys: tuple | None) -> int:
    """Deterministic across processes (unlike ``hash`` of a str); 128 bits keep collisions out of reach."""
    payload = repr((parent_hash, token_ids, extra_keys)).encode()
    return int.from_bytes(hashlib.sha256(payload).digest()[:16], "little")


def block_extra_keys(request: Request, sibling_group: str | None = None) -> tuple | None:
    if sibling_group is not None:
        return (request.lora_int_id, request.cache_salt, sibling_group)
    if request.lora_int_id == 0 and request.cache_salt is None:
        return None
    return (request.lora_int_id, request.cache_salt)


def sibling_group(request: Request) -> str | None:
    """The parent id of a child of an ``n > 1`` request, else None."""
    return request.parent_request_id


def update_block_hashes(request: Request, block_size: int, sibling_group: str | None = None) -> None:
    """Extends ``request.block_hashes`` to cover every full block of its known tokens.

    ``sibling_group`` keys the hashes to one n > 1 request (prefix caching off); a manager
    always passes the same value for a request, so the lazily grown list stays consistent.
    """
    hashes = request.block_hashes
    num_full_blocks = request.num_tokens // block_size
    if len(hashes) >= num_full_blocks:
        return
    extra_keys = block_extra_keys(request, sibling_group)
    parent = hashes[-1] if hashes else None
    for i in range(len(hashes), num_full_blocks):
        parent = hash_block_tokens(parent, _token_ids_between(request, i * block_size, (i + 1) * block_size),
                                   extra_keys)
        hashes.append(parent)


def _token_ids_between(request: Request, start: int, end: int) -> tuple[int, ...]:
    """Tokens [start, end) without concatenating the whole prompt and output (hot on long contexts)."""
    n = request.num_prompt_tokens
    return (tuple(request.prompt_token_ids[start:end])
            + tuple(request.output_token_ids[max(start - n, 0):max(end - n, 0)]))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.block_pool = BlockPool(num_blocks)
        # req_id -> block table, in token order.
        self.req_to_blocks: dict[str, list[KVBlock]] = {}
        # req_id -> how many leading blocks of its table are already in the prefix cache.
        self.num_cached_blocks: dict[str, int] = {}
        self.prefix_cache_stats = PrefixCacheStats()

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.block_pool.usage

    def get_block_ids(self, req_id: str) -> list[int]:
        return [block.block_id for block in self.req_to_blocks.get(req_id, ())]

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """Longest run of cached full blocks at the start of the request, and the tokens they hold.

        Read-only: the caller passes the blocks to ``allocate_slots``, which takes the references.
        """
        num_shareable_tokens = self._num_shareable_tokens(request)
        if num_shareable_tokens == 0:
            return [], 0
        update_block_hashes(request, self.block_size, self._hash_group(request))
        if request.sampling_params.prompt_logprobs is not None:
            return [], 0  # every prompt position must run to produce its logprobs
        max_hit_blocks = min(request.num_tokens - 1, num_shareable_tokens) // self.block_size
        blocks: list[KVBlock] = []
        for block_hash in request.block_hashes[:max_hit_blocks]:
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks, len(blocks) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: list[KVBlock] | None = None) -> list[int] | None:
        """Grows the block table to hold ``num_new_tokens`` more tokens; returns the new block ids.

        ``new_computed_blocks`` are prefix hits from ``get_computed_blocks`` (a request's first
        allocation); ``request.num_computed_tokens`` must not count them yet. Returns None, and
        changes nothing, when the free blocks do not suffice.

            before:  [b3 full][b7 2/4]              num_computed=6, num_new_tokens=5
            after:   [b3 full][b7 full][b1 3/4]     new block ids: [1]
        """
        if num_new_tokens < 1:
            raise ValueError(f"num_new_tokens must be at least 1, got {num_new_tokens}")
        req_blocks = self.req_to_blocks.get(request.request_id)
        if req_blocks is not None and not new_computed_blocks:
            num_total = request.num_computed_tokens + num_new_tokens
            if num_total <= len(req_blocks) * self.block_size:  # the common decode step: no new block
                self._cache_full_blocks(request, num_total)
                return []
        req_blocks = req_blocks if req_blocks is not None else []
        hits = new_computed_blocks or []
        if hits and req_blocks:
            raise ValueError("new_computed_blocks are only allowed on a request's first allocation")
        num_computed = request.num_computed_tokens + len(hits) * self.block_size
        num_total = num_computed + num_new_tokens
        num_new_blocks = max(0, _cdiv(num_total, self.block_size) - len(req_blocks) - len(hits))
        # Hits sitting in the free queue stop being free once touched.
        table_hits, held_hits = self._hits_to_hold(request, hits, num_computed)
        num_revived = sum(1 for block in held_hits if block.ref_cnt == 0)
        if num_new_blocks + num_revived > self.block_pool.num_free_blocks:
            return None

        if request.request_id not in self.req_to_blocks:
            self.req_to_blocks[request.request_id] = req_blocks
            self.num_cached_blocks[request.request_id] = len(hits)
            if self.enable_prefix_caching:
                self.prefix_cache_stats.queries += request.num_tokens
                self.prefix_cache_stats.hits += len(hits) * self.block_size
        self.block_pool.touch(held_hits)
        req_blocks.extend(table_hits)
        new_blocks = self.block_pool.get_new_blocks(num_new_blocks)
        req_blocks.extend(new_blocks)
        self._cache_full_blocks(request, num_total)
        return [block.block_id for block in new_blocks]

    def _hits_to_hold(self, request: Request, hits: list[KVBlock], num_computed: int
                      ) -> tuple[list[KVBlock], list[KVBlock]]:
        """(block table entries for the prefix hits, the hits to take references on): all of them here."""
        return hits, hits

    def _hash_group(self, request: Request) -> str | None:
        """The sibling group keying this request's hashes: only when prefix caching is off."""
        return None if self.enable_prefix_caching else sibling_group(request)

    def _num_shareable_tokens(self, request: Request) -> int:
        """Leading tokens whose full blocks may be shared: all with prefix caching, a sibling's prompt without."""
        if self.enable_prefix_caching:
            return request.num_tokens
        return request.num_prompt_tokens if sibling_group(request) is not None else 0

    def _cache_full_blocks(self, request: Request, num_total: int) -> None:
        """Publishes the blocks that the first ``num_total`` slots fill with known, shareable tokens."""
        num_shareable_tokens = self._num_shareable_tokens(request)
        if not num_shareable_tokens:
            return
        num_full_blocks = min(num_total, num_shareable_tokens) // self.block_size
        num_cached = self.num_cached_blocks[request.request_id]
        if num_full_blocks <= num_cached:
            return
        update_block_hashes(request, self.block_size, self._hash_group(request))
        req_blocks = self.req_to_blocks[request.request_id]
        for i in range(num_cached, num_full_blocks):
            self.block_pool.cache_full_block(req_blocks[i], request.block_hashes[i])
        self.num_cached_blocks[request.request_id] = num_full_blocks

    def can_swap(self, request: Request) -> bool:
        """Whether the request's table holds every computed block (swap preemption copies them all)."""
        return True

    def free(self, request: Request) -> None:
        """Releases the request's blocks, tail first so its tail is evicted before its head.

        Blocks past ``num_computed_tokens`` lose their hash: their KV was never written. Without
        prefix caching, a sibling-shared block loses it with its last reference.
        """
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self.num_cached_blocks.pop(request.request_id, None)
        self._release(blocks, request.num_computed_tokens // self.block_size)

    def _release(self, blocks: list[KVBlock], num_written_blocks: int) -> None:
        """Frees a block table, tail first; blocks from index ``num_written_blocks`` on lose their hash."""
        for block in blocks[num_written_blocks:]:
            self.block_pool.evict_cached_block(block)
        self.block_pool.free_blocks(reversed(blocks))
        if not self.enable_prefix_caching:
            for block in blocks:
                if block.ref_cnt == 0:
                    self.block_pool.evict_cached_block(block)

    def reset_prefix_cache(self) -> None:
        self.block_pool.reset_prefix_cache()
