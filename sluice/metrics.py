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

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess

from sluice.stats import IterationStats, SchedulerStats

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


def _gauge(registry: CollectorRegistry, model_name: str, name: str, doc: str) -> Gauge:
    # One writer per gauge (this process, or the engine core with several API servers): its latest value counts.
    return Gauge(PREFIX + name, doc, ["model_name"], registry=registry,
                 multiprocess_mode="mostrecent").labels(model_name)


def _counter(registry: CollectorRegistry, model_name: str, name: str, doc: str) -> Counter:
    return Counter(PREFIX + name, doc, ["model_name"], registry=registry).labels(model_name)


class SchedulerMetrics:
    """The scheduler's series: gauges of its state and counters of its cumulative totals."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        registry = registry or CollectorRegistry()
        self.num_requests_running = _gauge(registry, model_name, "num_requests_running",
                                           "Requests in the running batch.")
        self.num_requests_waiting = _gauge(registry, model_name, "num_requests_waiting",
                                           "Requests waiting to be scheduled.")
        self.kv_cache_usage = _gauge(registry, model_name, "kv_cache_usage_perc",
                                     "KV cache usage; 1 means 100 percent.")
        self.prefix_cache_queries = _counter(registry, model_name, "prefix_cache_queries",
                                             "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = _counter(registry, model_name, "prefix_cache_hits",
                                          "Prompt tokens found in the prefix cache.")
        self.num_preemptions = _counter(registry, model_name, "num_preemptions", "Cumulative number of preemptions.")
        # The scheduler reports cumulative totals; counters take increments.
        self._last_cumulative = SchedulerStats()

    def record(self, stats: SchedulerStats) -> None:
        self.num_requests_running.set(stats.num_running_reqs)
        self.num_requests_waiting.set(stats.num_waiting_reqs)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        last = self._last_cumulative
        self.prefix_cache_queries.inc(max(0, stats.prefix_cache_queries - last.prefix_cache_queries))
        self.prefix_cache_hits.inc(max(0, stats.prefix_cache_hits - last.prefix_cache_hits))
        self.num_preemptions.inc(max(0, stats.num_preemptions - last.num_preemptions))
        self._last_cumulative = SchedulerStats(prefix_cache_queries=stats.prefix_cache_queries,
                                               prefix_cache_hits=stats.prefix_cache_hits,
                                               num_preemptions=stats.num_preemptions)


class PrometheusStatLogger:
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
            return Histogram(PREFIX + name, doc, labels, buckets=buckets,
                             registry=self.registry).labels(model_name)

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
        self.request_queue_time = histogram("request_queue_time_seconds", "Time spent waiting.",
                                            _REQUEST_LATENCY_BUCKETS)

    def record(self, scheduler_stats: SchedulerStats, iteration_stats: IterationStats) -> None:
        if self.scheduler is not None:
            self.scheduler.record(scheduler_stats)
        self.prompt_tokens.inc(iteration_stats.num_prompt_tokens)
        self.generation_tokens.inc(iteration_stats.num_generation_tokens)
        for ttft in iteration_stats.time_to_first_tokens:
            self.time_to_first_token.observe(ttft)
        for itl in iteration_stats.inter_token_latencies:
            self.inter_token_latency.observe(itl)
        for finished in iteration_stats.finished_requests:
            self._request_success.labels(self._model_name, finished.finish_reason).inc()
            self.e2e_request_latency.observe(finished.e2e_latency)
            self.request_queue_time.observe(finished.queue_time)

    def render(self) -> bytes:
        multiproc_dir = os.environ.get(MULTIPROC_DIR_ENV)
        if not multiproc_dir:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=multiproc_dir)
        return generate_latest(merged)
