"""The periodic engine log line (LoggingStatLogger); the stats types live in sluice/stats.py."""
from __future__ import annotations

import logging
import time

from sluice.stats import FinishedRequestStats, IterationStats, SchedulerStats, StatLogger

__all__ = ["FinishedRequestStats", "IterationStats", "LoggingStatLogger", "SchedulerStats", "StatLogger"]


class LoggingStatLogger(StatLogger):
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
        spec = scheduler_stats.spec_decoding
        if spec is not None and spec.num_drafts:
            self._logger.info("speculative decoding: mean acceptance length %.2f, draft acceptance rate %.1f%%, "
                              "per position %s (cumulative)", 1 + spec.num_accepted_tokens / spec.num_drafts,
                              100 * spec.acceptance_rate,
                              ", ".join(f"{n / spec.num_drafts:.2f}" for n in spec.num_accepted_tokens_per_pos))
        self._last_log, self._prompt_tokens, self._generation_tokens = now, 0, 0
        self._last_queries, self._last_hits = scheduler_stats.prefix_cache_queries, scheduler_stats.prefix_cache_hits
