"""The statistics types every layer shares: the scheduler makes SchedulerStats, the engine fronts make
IterationStats, and stat loggers (engine/stats.py's log line, metrics.py's Prometheus series) read both.
Plain dataclasses, no imports of the engine: sluice.core may use them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from sluice.config import CacheConfig


@dataclass(slots=True)
class KVCacheEvents:
    """Sampled KV block timings since the last report, in seconds (``--kv-cache-metrics``; core/kv_metrics.py)."""
    lifetimes: list[float] = field(default_factory=list)  # allocation to eviction
    idle_before_evict: list[float] = field(default_factory=list)  # last use to eviction
    reuse_gaps: list[float] = field(default_factory=list)  # between consecutive uses of one block

    def extend(self, other: "KVCacheEvents") -> None:
        self.lifetimes += other.lifetimes
        self.idle_before_evict += other.idle_before_evict
        self.reuse_gaps += other.reuse_gaps


@dataclass(slots=True)
class OffloadStats:
    """Swap preemption and the host prefix tier (core/kv_offload.py), cumulative."""
    num_swapped_preemptions: int = 0
    num_recomputed_preemptions: int = 0
    swap_out_bytes: int = 0
    swap_in_bytes: int = 0
    host_tier_hits: int = 0  # tokens found in the host tier (also counted as prefix-cache hits)
    host_tier_offloaded_blocks: int = 0


@dataclass(slots=True)
class LoRAStats:
    """Adapters of the running and waiting requests (vLLM's lora_requests_info); only with LoRA on."""
    max_loras: int
    running_lora_adapters: list[str] = field(default_factory=list)  # adapter names, sorted
    waiting_lora_adapters: list[str] = field(default_factory=list)


@dataclass(slots=True)
class SpecDecodingStats:
    """Speculative decoding, cumulative: proposals verified, and how many were kept at each position."""
    num_drafts: int = 0  # requests-steps that verified at least one proposal
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)  # [i]: kept proposals at position i

    def observe(self, num_draft_tokens: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        per_pos = self.num_accepted_tokens_per_pos
        if len(per_pos) < num_draft_tokens:
            per_pos.extend([0] * (num_draft_tokens - len(per_pos)))
        for i in range(num_accepted):
            per_pos[i] += 1

    def copy(self) -> "SpecDecodingStats":
        return SpecDecodingStats(self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens,
                                 list(self.num_accepted_tokens_per_pos))

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0


@dataclass(slots=True)
class SchedulerStats:
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    kv_cache_usage: float = 0.0  # fraction of KV blocks in use, 0..1
    prefix_cache_queries: int = 0  # cumulative tokens looked up
    prefix_cache_hits: int = 0  # cumulative tokens found
    num_preemptions: int = 0  # cumulative
    # Of num_waiting_reqs, those held back by KV blocks or max_num_seqs (or a preemption) in the last step;
    # the rest were deferred by the step's token budget only (vLLM's num_requests_waiting_by_reason).
    num_waiting_for_capacity: int = 0
    kv_cache_events: KVCacheEvents | None = None  # only with --kv-cache-metrics
    kv_offload: OffloadStats | None = None  # only with --swap-space or --kv-offload-space (cumulative)
    lora: LoRAStats | None = None  # only with --enable-lora
    spec_decoding: SpecDecodingStats | None = None  # only with --speculative-config, once it verified (cumulative)


@dataclass(slots=True)
class FinishedRequestStats:
    finish_reason: str
    e2e_latency: float
    queue_time: float  # arrival to first scheduling
    num_prompt_tokens: int
    num_generation_tokens: int
    request_id: str = ""
    arrival_time: float = 0.0  # time.monotonic()
    prefill_time: float = 0.0  # first scheduling to first token
    decode_time: float = 0.0  # first token to last token
    inference_time: float = 0.0  # first scheduling to last token
    ttft: float | None = None  # None when no token came (an abort in the queue)
    n: int = 0  # the request's n, on its first completion only (0 on the others: one count per request)
    max_tokens: int | None = None
    num_cached_tokens: int = 0
    priority: int = 0


@dataclass(slots=True)
class IterationStats:
    num_prompt_tokens: int = 0  # prompt tokens of requests that got their first token this step
    num_generation_tokens: int = 0
    time_to_first_tokens: list[float] = field(default_factory=list)
    inter_token_latencies: list[float] = field(default_factory=list)
    finished_requests: list[FinishedRequestStats] = field(default_factory=list)
    step_start_time: float = 0.0  # time.monotonic() when the step began (the front end's view)


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What a stat logger learns once the engine is up (``log_engine_initialized``)."""
    cache: CacheConfig  # the KV cache as the core sized it
    startup_seconds: dict[str, float]  # phase -> seconds (the core's start-up, engine/startup.py)


class StatLogger(Protocol):
    """A consumer of the engine's stats. ``record`` runs after every step; ``log_engine_initialized`` once,
    when the engine is up (a no-op unless overridden, for loggers that subclass this)."""

    def record(self, scheduler_stats: SchedulerStats, iteration_stats: IterationStats) -> None: ...

    def log_engine_initialized(self, info: EngineInfo) -> None:
        return None
