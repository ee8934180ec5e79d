"""Prometheus metrics with vLLM's names under the ``sluice:`` prefix.

``PrometheusStatLogger`` is a stat logger (``record(scheduler_stats, iteration_stats)``,
called by the engine after every step, from the engine thread; prometheus_client is
thread-safe). Each logger owns its CollectorRegistry so that several servers or tests in
one process never collide; ``render()`` gives the text exposition for ``GET /metrics``.

Several API server processes (``--api-server-count``) report as one server, as vLLM does:
prometheus_client's multiprocess mode, switched on by ``PROMETHEUS_MULTIPROC_DIR`` in the
environment before prometheus_client is imported (the parent process sets it for its children).
Each process writes its samples there and every API server's /metrics renders the merge. The
request series (tokens, finished requests, TTFT, ITL, latencies) come from the API servers,
each counting its own requests, and are summed. The scheduler's series (running, waiting, KV
cache usage, prefix-cache queries and hits, preemptions: ``SchedulerMetrics``) come from the
engine core process itself, their one writer, so no API server's late view of them can win.
"""
from __future__ import annotations

import dataclasses
import os
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess

from sluice.stats import (EngineInfo, IterationStats, KVCacheEvents, LoRAStats, OffloadStats, SchedulerStats,
                          SpecDecodingStats, StatLogger)

PREFIX = "sluice:"
MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST

# Bucket edges as vLLM uses them, so dashboards built for vLLM read the same.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                            40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
_FINISH_REASONS = ("stop", "length", "abort")
_ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
_N_BUCKETS = (1, 2, 5, 10, 20)
_KV_BLOCK_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0,
                     120.0, 300.0, 600.0, 1200.0, 1800.0)
WAITING_REASONS = ("capacity", "deferred")


def _one_two_five_buckets(largest: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``largest`` (vLLM's token-count buckets)."""
    out, scale = [], 1
    while True:
        for step in (1, 2, 5):
            if step * scale > largest:
                return tuple(out)
            out.append(step * scale)
        scale *= 10


_TOKEN_COUNT_BUCKETS = _one_two_five_buckets(1_000_000)
# cache_config_info's labels: sluice's CacheConfig fields, plus vLLM's num_gpu_blocks for the pool size.
_CACHE_CONFIG_LABELS = ("model_name", "block_size", "cache_dtype", "enable_prefix_caching", "num_blocks",
                        "num_gpu_blocks", "num_cpu_blocks", "swap_space_bytes")


# A series' base labels: the served model name, and ``engine`` (the core's index) under data parallelism, where
# every engine core writes its own scheduler series (as vLLM labels them).
Labels = dict[str, str]


def _base_labels(model_name: str | Labels) -> Labels:
    return {"model_name": model_name} if isinstance(model_name, str) else model_name


def _gauge(registry: CollectorRegistry, model_name: str | Labels, name: str, doc: str) -> Gauge:
    # One writer per gauge (this process, or the engine core with several API servers): its latest value counts.
    labels = _base_labels(model_name)
    return Gauge(PREFIX + name, doc, list(labels), registry=registry,
                 multiprocess_mode="mostrecent").labels(**labels)


def _counter(registry: CollectorRegistry, model_name: str | Labels, name: str, doc: str) -> Counter:
    labels = _base_labels(model_name)
    return Counter(PREFIX + name, doc, list(labels), registry=registry).labels(**labels)


def _histogram(registry: CollectorRegistry, model_name: str | Labels, name: str, doc: str,
               buckets: tuple[float, ...]) -> Histogram:
    labels = _base_labels(model_name)
    return Histogram(PREFIX + name, doc, list(labels), buckets=buckets, registry=registry).labels(**labels)


class KVCacheMetrics:
    """``--kv-cache-metrics``: sampled KV block residency histograms (sluice/core/kv_metrics.py)."""

    def __init__(self, registry: CollectorRegistry, model_name: str | Labels) -> None:
        self.lifetime = _histogram(registry, model_name, "kv_block_lifetime_seconds",
                                   "KV block lifetime from allocation to eviction (sampled blocks).", _KV_BLOCK_BUCKETS)
        self.idle_before_evict = _histogram(registry, model_name, "kv_block_idle_before_evict_seconds",
                                            "Time a KV block sat unused before its eviction (sampled blocks).",
                                            _KV_BLOCK_BUCKETS)
        self.reuse_gap = _histogram(registry, model_name, "kv_block_reuse_gap_seconds",
                                    "Time between consecutive uses of a KV block (sampled blocks).", _KV_BLOCK_BUCKETS)

    def record(self, events: KVCacheEvents) -> None:
        for value in events.lifetimes:
            self.lifetime.observe(value)
        for value in events.idle_before_evict:
            self.idle_before_evict.observe(value)
        for value in events.reuse_gaps:
            self.reuse_gap.observe(value)


class KVOffloadMetrics:
    """``--swap-space`` / ``--kv-offload-space``: preemptions by mode, bytes swapped, host-tier hits
    (sluice/core/kv_offload.py)."""

    def __init__(self, registry: CollectorRegistry, model_name: str | Labels) -> None:
        base = _base_labels(model_name)
        by_mode = Counter(PREFIX + "num_preemptions_by_mode", "Preemptions by how the KV was given up: "
                          "swap (copied to host memory) or recompute.", [*base, "mode"], registry=registry)
        self.preemptions = {mode: by_mode.labels(**base, mode=mode) for mode in ("swap", "recompute")}
        swapped = Counter(PREFIX + "kv_swap_bytes", "KV bytes copied for swap preemption, out to host memory "
                          "and back in.", [*base, "direction"], registry=registry)
        self.swap_bytes = {direction: swapped.labels(**base, direction=direction) for direction in ("out", "in")}
        self.host_hits = _counter(registry, model_name, "prefix_cache_host_hits",
                                  "Prompt tokens found in the host prefix-cache tier (also counted in "
                                  "prefix_cache_hits).")
        self.offloaded_blocks = _counter(registry, model_name, "kv_offload_blocks",
                                         "KV blocks evicted from the device cache and kept in the host tier.")
        self._last = OffloadStats()

    def record(self, stats: OffloadStats) -> None:
        last = self._last
        self.preemptions["swap"].inc(max(0, stats.num_swapped_preemptions - last.num_swapped_preemptions))
        self.preemptions["recompute"].inc(max(0, stats.num_recomputed_preemptions - last.num_recomputed_preemptions))
        self.swap_bytes["out"].inc(max(0, stats.swap_out_bytes - last.swap_out_bytes))
        self.swap_bytes["in"].inc(max(0, stats.swap_in_bytes - last.swap_in_bytes))
        self.host_hits.inc(max(0, stats.host_tier_hits - last.host_tier_hits))
        self.offloaded_blocks.inc(max(0, stats.host_tier_offloaded_blocks - last.host_tier_offloaded_blocks))
        self._last = dataclasses.replace(stats)


class SpecDecodingMetrics:
    """``--speculative-config``: proposals verified and kept, in total and per position (vLLM's spec_decode_*)."""

    def __init__(self, registry: CollectorRegistry, model_name: str | Labels) -> None:
        labels = _base_labels(model_name)
        self.num_drafts = _counter(registry, labels, "spec_decode_num_drafts",
                                   "Requests-steps that verified proposed tokens.")
        self.num_draft_tokens = _counter(registry, labels, "spec_decode_num_draft_tokens",
                                         "Proposed tokens verified.")
        self.num_accepted_tokens = _counter(registry, labels, "spec_decode_num_accepted_tokens",
                                            "Proposed tokens kept.")
        accepted_per_pos = Counter(PREFIX + "spec_decode_num_accepted_tokens_per_pos",
                                   "Proposed tokens kept, by position among a request's proposals.",
                                   [*labels, "position"], registry=registry)
        self.accepted_per_pos = lambda position: accepted_per_pos.labels(**labels, position=position)
        self._last = SpecDecodingStats()

    def record(self, stats: SpecDecodingStats) -> None:
        last = self._last
        self.num_drafts.inc(max(0, stats.num_drafts - last.num_drafts))
        self.num_draft_tokens.inc(max(0, stats.num_draft_tokens - last.num_draft_tokens))
        self.num_accepted_tokens.inc(max(0, stats.num_accepted_tokens - last.num_accepted_tokens))
        previous = last.num_accepted_tokens_per_pos
        for position, count in enumerate(stats.num_accepted_tokens_per_pos):
            delta = count - (previous[position] if position < len(previous) else 0)
            self.accepted_per_pos(str(position)).inc(max(0, delta))
        self._last = stats.copy()


class SchedulerMetrics:
    """The scheduler's series: gauges of its state and counters of its cumulative totals.

    ``engine_index``: one of several data-parallel engine cores; its series carry ``engine="<index>"``."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None,
                 engine_index: int | None = None) -> None:
        registry = registry or CollectorRegistry()
        labels: Labels = {"model_name": model_name}
        if engine_index is not None:
            labels["engine"] = str(engine_index)
        self._registry, self._labels = registry, labels
        self.num_requests_running = _gauge(registry, labels, "num_requests_running",
                                           "Requests in the running batch.")
        self.num_requests_waiting = _gauge(registry, labels, "num_requests_waiting",
                                           "Requests waiting to be scheduled.")
        self.kv_cache_usage = _gauge(registry, labels, "kv_cache_usage_perc",
                                     "KV cache usage; 1 means 100 percent.")
        self.prefix_cache_queries = _counter(registry, labels, "prefix_cache_queries",
                                             "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = _counter(registry, labels, "prefix_cache_hits",
                                          "Prompt tokens found in the prefix cache.")
        self.num_preemptions = _counter(registry, labels, "num_preemptions", "Cumulative number of preemptions.")
        waiting_by_reason = Gauge(PREFIX + "num_requests_waiting_by_reason",
                                  "Waiting requests by reason: capacity (KV blocks, max_num_seqs, a preemption) or "
                                  "deferred (the step's token budget ran out first).", [*labels, "reason"],
                                  registry=registry, multiprocess_mode="mostrecent")
        self.waiting_by_reason = {reason: waiting_by_reason.labels(**labels, reason=reason)
                                  for reason in WAITING_REASONS}
        self.kv_cache: KVCacheMetrics | None = None  # made by the first --kv-cache-metrics report
        self.kv_offload: KVOffloadMetrics | None = None  # made by the first report with swap or a host tier
        self.lora_info: Gauge | None = None  # made by the first report with LoRA on
        self.spec_decoding: SpecDecodingMetrics | None = None  # made by the first report that verified proposals
        # The scheduler reports cumulative totals; counters take increments.
        self._last_cumulative = SchedulerStats()

    def record(self, stats: SchedulerStats) -> None:
        self.num_requests_running.set(stats.num_running_reqs)
        self.num_requests_waiting.set(stats.num_waiting_reqs)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        self.waiting_by_reason["capacity"].set(stats.num_waiting_for_capacity)
        self.waiting_by_reason["deferred"].set(stats.num_waiting_reqs - stats.num_waiting_for_capacity)
        if stats.kv_cache_events is not None:
            if self.kv_cache is None:
                self.kv_cache = KVCacheMetrics(self._registry, self._labels)
            self.kv_cache.record(stats.kv_cache_events)
        if stats.kv_offload is not None:
            if self.kv_offload is None:
                self.kv_offload = KVOffloadMetrics(self._registry, self._labels)
            self.kv_offload.record(stats.kv_offload)
        if stats.lora is not None:
            self._record_lora(stats.lora)
        if stats.spec_decoding is not None:
            if self.spec_decoding is None:
                self.spec_decoding = SpecDecodingMetrics(self._registry, self._labels)
            self.spec_decoding.record(stats.spec_decoding)
        last = self._last_cumulative
        self.prefix_cache_queries.inc(max(0, stats.prefix_cache_queries - last.prefix_cache_queries))
        self.prefix_cache_hits.inc(max(0, stats.prefix_cache_hits - last.prefix_cache_hits))
        self.num_preemptions.inc(max(0, stats.num_preemptions - last.num_preemptions))
        self._last_cumulative = SchedulerStats(prefix_cache_queries=stats.prefix_cache_queries,
                                               prefix_cache_hits=stats.prefix_cache_hits,
                                               num_preemptions=stats.num_preemptions)


    def _record_lora(self, lora: LoRAStats) -> None:
        """vLLM's lora_requests_info: one sample whose labels name the adapters, valued at the report's time."""
        if self.lora_info is None:
            self.lora_info = Gauge(PREFIX + "lora_requests_info", "Running stats on LoRA requests.",
                                   ["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
                                   registry=self._registry, multiprocess_mode="livemostrecent")
        self.lora_info.clear()
        self.lora_info.labels(str(lora.max_loras), ",".join(lora.waiting_lora_adapters),
                              ",".join(lora.running_lora_adapters)).set(time.time())


class PrometheusStatLogger(StatLogger):
    """Turns engine stats into Prometheus series labelled with the served model name.

    ``scheduler_series=False``: only the request series; the scheduler's come from elsewhere (the engine core
    process, when several API servers share it).
    """

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None,
                 scheduler_series: bool = True) -> None:
        self.registry = registry or CollectorRegistry()
        labels = ["model_name"]
        self._model_name = model_name

        def counter(name: str, doc: str) -> Counter:
            return _counter(self.registry, model_name, name, doc)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return _histogram(self.registry, model_name, name, doc, buckets)

        self.scheduler = SchedulerMetrics(model_name, self.registry) if scheduler_series else None
        self.prompt_tokens = counter("prompt_tokens", "Prefill tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Generation tokens processed.")
        self._request_success = Counter(PREFIX + "request_success", "Finished requests by finish reason.",
                                        labels + ["finished_reason"], registry=self.registry)
        for reason in _FINISH_REASONS:  # expose zeros up front, as vLLM does
            self._request_success.labels(model_name, reason)
        self.time_to_first_token = histogram("time_to_first_token_seconds", "Time to first token.",
                                             _TTFT_BUCKETS)
        self.inter_token_latency = histogram("inter_token_latency_seconds", "Time between output tokens.",
                                             _ITL_BUCKETS)
        self.e2e_request_latency = histogram("e2e_request_latency_seconds", "Arrival to finish.",
                                             _REQUEST_LATENCY_BUCKETS)
        self.request_queue_time = histogram("request_queue_time_seconds",
                                            "Arrival to first scheduling (time in the waiting queue).",
                                            _REQUEST_LATENCY_BUCKETS)
        self.request_prefill_time = histogram("request_prefill_time_seconds", "First scheduling to first token.",
                                              _REQUEST_LATENCY_BUCKETS)
        self.request_decode_time = histogram("request_decode_time_seconds", "First token to last token.",
                                             _REQUEST_LATENCY_BUCKETS)
        self.request_inference_time = histogram("request_inference_time_seconds",
                                                "First scheduling to last token (prefill + decode).",
                                                _REQUEST_LATENCY_BUCKETS)
        self.iteration_tokens = histogram("iteration_tokens_total", "Prompt and generation tokens per engine step.",
                                          _ITERATION_TOKEN_BUCKETS)
        self.request_prompt_tokens = histogram("request_prompt_tokens", "Prompt tokens per finished request.",
                                               _TOKEN_COUNT_BUCKETS)
        self.request_generation_tokens = histogram("request_generation_tokens",
                                                   "Generation tokens per finished request (completion).",
                                                   _TOKEN_COUNT_BUCKETS)
        self.request_params_n = histogram("request_params_n", "The n parameter of finished requests.", _N_BUCKETS)
        self.request_params_max_tokens = histogram("request_params_max_tokens",
                                                   "The max_tokens parameter of finished requests.",
                                                   _TOKEN_COUNT_BUCKETS)
        self._cache_config_info = Gauge(PREFIX + "cache_config_info", "The KV cache configuration (labels).",
                                        labelnames=_CACHE_CONFIG_LABELS, registry=self.registry,
                                        multiprocess_mode="mostrecent")
        self._startup_seconds = Gauge(PREFIX + "engine_startup_seconds",
                                      "Start-up time by phase (config, weights, profiling, kv_cache, graph_capture; "
                                      "ready: process start to serving).", ["model_name", "phase"],
                                      registry=self.registry, multiprocess_mode="mostrecent")

    def log_engine_initialized(self, info: EngineInfo) -> None:
        cache = dataclasses.asdict(info.cache)
        labels = {name: str(cache.get(name, "")) for name in _CACHE_CONFIG_LABELS}
        labels["num_gpu_blocks"] = str(cache.get("num_blocks", ""))  # vLLM's name for the pool size
        labels["model_name"] = self._model_name
        self._cache_config_info.labels(**labels).set(1)
        for phase, seconds in info.startup_seconds.items():
            self.log_startup_phase(phase, seconds)

    def log_startup_phase(self, phase: str, seconds: float) -> None:
        self._startup_seconds.labels(self._model_name, phase).set(seconds)

    def record(self, scheduler_stats: SchedulerStats, iteration_stats: IterationStats) -> None:
        if self.scheduler is not None:
            self.scheduler.record(scheduler_stats)
        self.prompt_tokens.inc(iteration_stats.num_prompt_tokens)
        self.generation_tokens.inc(iteration_stats.num_generation_tokens)
        num_step_tokens = iteration_stats.num_prompt_tokens + iteration_stats.num_generation_tokens
        if num_step_tokens:
            self.iteration_tokens.observe(num_step_tokens)
        for ttft in iteration_stats.time_to_first_tokens:
            self.time_to_first_token.observe(ttft)
        for itl in iteration_stats.inter_token_latencies:
            self.inter_token_latency.observe(itl)
        for finished in iteration_stats.finished_requests:
            self._request_success.labels(self._model_name, finished.finish_reason).inc()
            self.e2e_request_latency.observe(finished.e2e_latency)
            self.request_queue_time.observe(finished.queue_time)
            self.request_prefill_time.observe(finished.prefill_time)
            self.request_decode_time.observe(finished.decode_time)
            self.request_inference_time.observe(finished.inference_time)
            self.request_prompt_tokens.observe(finished.num_prompt_tokens)
            self.request_generation_tokens.observe(finished.num_generation_tokens)
            if finished.n:  # the request's first completion: one count per request
                self.request_params_n.observe(finished.n)
                if finished.max_tokens is not None:
                    self.request_params_max_tokens.observe(finished.max_tokens)

    def render(self) -> bytes:
        multiproc_dir = os.environ.get(MULTIPROC_DIR_ENV)
        if not multiproc_dir:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=multiproc_dir)
        return generate_latest(merged)
