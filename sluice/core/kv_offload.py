"""KV beyond the device pool: swap preemption and the host prefix-cache tier (pure Python, no tensors).

The scheduler holds one ``KVOffload`` when ``--swap-space`` or ``--kv-offload-space`` is set (else None, and
every hook is skipped by one ``is None`` check). It decides, and records what the runner must copy; the runner
copies (sluice/worker/kv_swap.py). Host blocks live in one id space:

    host block ids:  [ 0 .. num_swap_blocks )             swap space: KV of swapped-out (preempted) requests
                     [ num_swap_blocks .. + num_offload ) host prefix tier: full blocks evicted from the device,
                                                          keyed by the same block hash, LRU

One step's copies (``KVTransfers``) run before its forward, device->host first, then host->device:

    preempt victim (swap):   its computed blocks  device -> swap space, device blocks freed
    device eviction (tier):  a hashed free block reused -> its KV copied to the tier first
    resume / tier hit:       host -> freshly allocated device blocks, before the step reads them

A device block freed this step may be refilled by a host->device copy of the same step, so the device->host
copies go first. A host block freed this step (a resumed request's swap blocks) is reused only from the next
step on (``_released``), and a tier entry loaded this step is never the one evicted, so no step writes a host
block it also reads.

Resuming is a prefix hit by another name: the waiting loop asks ``num_loadable_tokens`` after the device lookup,
allocates device blocks for those tokens with the chunk's, and ``admit`` records the copies. Swapped requests
restart from ``num_computed_tokens`` = 0 like recomputed ones; what they carry is the host blocks.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from sluice.core.block_pool import KVBlock
from sluice.core.kv_cache_manager import KVCacheManager
from sluice.core.request import Request
from sluice.stats import OffloadStats

PREEMPTION_MODES = ("auto", "recompute", "swap")


@dataclass(slots=True)
class KVTransfers:
    """One step's block copies, (source, destination) block ids, in order: device->host, then host->device."""
    device_to_host: list[tuple[int, int]] = field(default_factory=list)
    host_to_device: list[tuple[int, int]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.device_to_host or self.host_to_device)


@dataclass(frozen=True, slots=True)
class PreemptionCosts:
    """What start-up measured, for choosing between recompute and swap per victim.

    Recomputing T tokens costs about ``flops_per_token * T + attention_flops_per_token_pair * T^2 / 2`` FLOPs at
    ``matmul_flops_per_s``; swapping costs its blocks' bytes out and back in at ``copy_bytes_per_s``."""
    flops_per_token: float  # 2 x parameters
    attention_flops_per_token_pair: float  # 4 x layers x heads x head_dim (QK^T and PV)
    matmul_flops_per_s: float
    bytes_per_block: int
    copy_bytes_per_s: float

    def recompute_seconds(self, num_tokens: int) -> float:
        flops = self.flops_per_token * num_tokens + self.attention_flops_per_token_pair * num_tokens ** 2 / 2
        return flops / self.matmul_flops_per_s

    def swap_seconds(self, num_blocks: int) -> float:
        return 2 * num_blocks * self.bytes_per_block / self.copy_bytes_per_s


class KVOffload:
    """Swap space and host prefix tier bookkeeping; the scheduler's one hook object for both."""

    def __init__(self, block_size: int, bytes_per_block: int, num_swap_blocks: int = 0, num_offload_blocks: int = 0,
                 preemption_mode: str = "auto", costs: PreemptionCosts | None = None) -> None:
        if preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {', '.join(PREEMPTION_MODES)}, got {preemption_mode!r}")
        if preemption_mode == "auto" and num_swap_blocks and costs is None:
            raise ValueError("preemption_mode auto needs measured PreemptionCosts")
        self.block_size = block_size
        self.bytes_per_block = bytes_per_block
        self.num_swap_blocks = num_swap_blocks
        self.num_offload_blocks = num_offload_blocks
        self.preemption_mode = preemption_mode
        self.costs = costs
        self._free_swap_blocks: list[int] = list(range(num_swap_blocks - 1, -1, -1))
        self._released: list[int] = []  # swap blocks freed this step: free from the next step on
        # req_id -> (host block ids in token order, tokens they hold)
        self.swapped: dict[str, tuple[list[int], int]] = {}
        # Host tier: block hash -> host block id, least recently used first.
        self.host_tier: OrderedDict[int, int] = OrderedDict()
        self._free_tier_blocks: list[int] = list(range(num_swap_blocks + num_offload_blocks - 1,
                                                       num_swap_blocks - 1, -1))
        self._loaded_this_step: set[int] = set()
        self.transfers = KVTransfers()
        self.stats = OffloadStats()

    # ---- preemption ------------------------------------------------------------------------------
    def swap_out(self, request: Request, kv_cache_manager: KVCacheManager) -> bool:
        """Swaps the victim's computed KV out if the policy says so and there is room; False: recompute.
        Call before the manager frees the request's blocks."""
        num_tokens = request.num_computed_tokens
        device_blocks = kv_cache_manager.req_to_blocks.get(request.request_id, [])
        num_blocks = -(-num_tokens // self.block_size)
        # Prompt logprobs: every prompt position runs again, as on a recompute.
        if (num_tokens == 0 or request.sampling_params.prompt_logprobs is not None
                or not self._prefers_swap(num_tokens, num_blocks)
                or num_blocks > len(self._free_swap_blocks) or not kv_cache_manager.can_swap(request)):
            self.stats.num_recomputed_preemptions += 1
            return False
        host_blocks = [self._free_swap_blocks.pop() for _ in range(num_blocks)]
        self.transfers.device_to_host += [(block.block_id, host) for block, host in
                                          zip(device_blocks[:num_blocks], host_blocks)]
        self.swapped[request.request_id] = (host_blocks, num_tokens)
        self.stats.num_swapped_preemptions += 1
        self.stats.swap_out_bytes += num_blocks * self.bytes_per_block
        return True

    def _prefers_swap(self, num_tokens: int, num_blocks: int) -> bool:
        if self.preemption_mode != "auto":
            return self.preemption_mode == "swap"
        if self.costs is None:
            return False
        return self.costs.swap_seconds(num_blocks) < self.costs.recompute_seconds(num_tokens)

    # ---- admission: the tokens host blocks can supply ---------------------------------------------
    def num_loadable_tokens(self, request: Request, num_device_hit_tokens: int) -> int:
        """Tokens past the device prefix hit whose KV host blocks hold: a swapped request's own, or host-tier
        hits. Capped so at least one token runs."""
        limit = request.num_tokens - 1 - num_device_hit_tokens
        swapped = self.swapped.get(request.request_id)
        if swapped is not None:
            return max(0, min(swapped[1] - num_device_hit_tokens, limit))
        if not self.host_tier or not request.block_hashes or request.sampling_params.prompt_logprobs is not None:
            return 0
        first = num_device_hit_tokens // self.block_size
        num_hits = min(len(request.block_hashes) - first, max(0, limit) // self.block_size)
        for i, block_hash in enumerate(request.block_hashes[first:first + num_hits]):
            host = self.host_tier.get(block_hash)
            if host is None:
                num_hits = i
                break
            # The allocation that follows may evict device blocks into the tier: these entries must stay.
            self.host_tier.move_to_end(block_hash)
            self._loaded_this_step.add(host)
        return num_hits * self.block_size

    def admit(self, request: Request, device_blocks: list[KVBlock], num_device_hit_tokens: int,
              num_tokens: int) -> None:
        """The request was admitted with ``num_tokens`` loadable tokens after its device hit: records their
        host->device copies into its block table. A swapped request's host blocks are released either way."""
        first = num_device_hit_tokens // self.block_size
        last = -(-(num_device_hit_tokens + num_tokens) // self.block_size) if num_tokens else first
        swapped = self.swapped.pop(request.request_id, None)
        if swapped is not None:
            host_blocks = swapped[0]
            sources = host_blocks[first:last]
            self._released += host_blocks
            self.stats.swap_in_bytes += len(sources) * self.bytes_per_block
        else:
            sources = []
            for block_hash in request.block_hashes[first:last]:
                self.host_tier.move_to_end(block_hash)
                sources.append(self.host_tier[block_hash])
            self._loaded_this_step.update(sources)
            self.stats.host_tier_hits += num_tokens
        self.transfers.host_to_device += [(host, block.block_id) for host, block in
                                          zip(sources, device_blocks[first:last])]

    def is_swapped(self, request: Request) -> bool:
        return request.request_id in self.swapped

    # ---- the host tier: device evictions land here ------------------------------------------------
    def offload_evicted(self, block: KVBlock) -> None:
        """BlockPool's eviction hook: a hashed free block is about to be reused; keep its KV on the host."""
        block_hash = block.block_hash
        if block_hash is None or block_hash in self.host_tier:
            if block_hash is not None:
                self.host_tier.move_to_end(block_hash)
            return
        if self._free_tier_blocks:
            host = self._free_tier_blocks.pop()
        else:
            lru_hash, host = next(iter(self.host_tier.items()))
            if host in self._loaded_this_step:  # read by this step: not overwritten by it
                return
            del self.host_tier[lru_hash]
        self.host_tier[block_hash] = host
        self.transfers.device_to_host.append((block.block_id, host))
        self.stats.host_tier_offloaded_blocks += 1

    # ---- per step and per request -----------------------------------------------------------------
    def take_transfers(self) -> KVTransfers | None:
        """The step's copies (None if none); host blocks freed this step become free for the next."""
        transfers, self.transfers = self.transfers, KVTransfers()
        self._free_swap_blocks += self._released
        self._released = []
        self._loaded_this_step.clear()
        return transfers or None

    def free(self, request: Request) -> None:
        """A finished or aborted request gives its swap blocks back."""
        swapped = self.swapped.pop(request.request_id, None)
        if swapped is not None:
            self._released += swapped[0]

    def check_all_free(self) -> None:
        """The block-leak invariant on the host: no swapped request left, every swap block free (the tier is a
        cache: its blocks hold KV for later hits, and it never grows past its size)."""
        if self.swapped:
            raise AssertionError(f"requests still swapped out: {sorted(self.swapped)}")
        free = sorted(self._free_swap_blocks + self._released)
        if free != list(range(self.num_swap_blocks)):
            raise AssertionError(f"swap blocks not free: {sorted(set(range(self.num_swap_blocks)) - set(free))}")
        if len(self.host_tier) + len(self._free_tier_blocks) != self.num_offload_blocks:
            raise AssertionError("host tier blocks leaked")


def install_kv_offload(scheduler, offload: KVOffload) -> None:
    """Hands the scheduler its offload object; with a host tier, device evictions feed it."""
    scheduler.kv_offload = offload
    if offload.num_offload_blocks:
        scheduler.kv_cache_manager.block_pool.on_evict = offload.offload_evicted
