"""Per-step statistics the engine hands to stat loggers (Prometheus, periodic log lines)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Protocol


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


@dataclass(slots=True)
class EngineInfo:
    """What a stat logger learns once the engine is up (``log_engine_initialized``)."""
    cache_config: object  # sluice.config.CacheConfig
    startup_seconds: dict[str, float]  # phase -> seconds (EngineCore.startup_seconds)


class StatLogger(Protocol):
    def record(self, scheduler_stats: SchedulerStats, iteration_stats: IterationStats) -> None: ...

    # Optional: ``log_engine_initialized(info: EngineInfo) -> None``, called once the engine is built.


class LoggingStatLogger:
    """Logs throughput and cache state every ``interval`` seconds, like vLLM's periodic engine log line."""

    def __init__(self, interval: float = 5.0, logger_name: str = "sluice.stats") -> None:
        self._clock = time.monotonic
        self._logger = logging.getLogger(logger_name)
        self.interval = interval
        self._last_log = self._clock()
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._last_hits = 0
        self._last_queries = 0

    def record(self, scheduler_stats: SchedulerStats, iteration_stats: IterationStats) -> None:
        self._prompt_tokens += iteration_stats.num_prompt_tokens
        self._generation_tokens += iteration_stats.num_generation_tokens
        now = self._clock()
        elapsed = now - self._last_log
        if elapsed < self.interval:
            return
        queries = scheduler_stats.prefix_cache_queries - self._last_queries
        hits = scheduler_stats.prefix_cache_hits - self._last_hits
        self._logger.info(
            "prompt %.1f tok/s, generation %.1f tok/s, running %d, waiting %d, KV cache %.1f%%, "
            "prefix cache hit rate %.1f%%, preemptions %d",
            self._prompt_tokens / elapsed, self._generation_tokens / elapsed, scheduler_stats.num_running_reqs,
            scheduler_stats.num_waiting_reqs, 100 * scheduler_stats.kv_cache_usage,
            100 * hits / queries if queries else 0.0, scheduler_stats.num_preemptions)
        self._last_log, self._prompt_tokens, self._generation_tokens = now, 0, 0
        self._last_queries, self._last_hits = scheduler_stats.prefix_cache_queries, scheduler_stats.prefix_cache_hits
