"""The dashboard's JSON from Prometheus snapshots, its Basic auth, and request spans (in-memory exporter)."""
from __future__ import annotations

import base64

import pytest

from sluice.stats import FinishedRequestStats, IterationStats, SchedulerStats
from sluice.entrypoints.openai.dashboard import (basic_auth_matches, build_stats, histogram_quantile,
                                                 is_dashboard_path, parse_snapshot)
from sluice.metrics import PrometheusStatLogger


def _finished(ttft: float, e2e: float, reason: str = "length") -> FinishedRequestStats:
    return FinishedRequestStats(reason, e2e, 0.01, 10, 5, request_id="r", arrival_time=1.0, ttft=ttft, n=1,
                                max_tokens=5)


def test_histogram_quantile_interpolates_like_prometheus():
    buckets = [(0.1, 0.0), (0.5, 50.0), (1.0, 100.0), (float("inf"), 100.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.5)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.3)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.99)
    assert histogram_quantile(0.5, [(1.0, 0.0), (float("inf"), 0.0)]) is None


def test_stats_give_rates_between_snapshots_and_percentiles_of_new_observations():
    metrics = PrometheusStatLogger("m")
    first = parse_snapshot(metrics.render().decode(), t=100.0)
    metrics.record(SchedulerStats(num_running_reqs=3, num_waiting_reqs=2, num_waiting_for_capacity=2,
                                  kv_cache_usage=0.5, prefix_cache_queries=100, prefix_cache_hits=25),
                   IterationStats(num_prompt_tokens=40, num_generation_tokens=20,
                                  time_to_first_tokens=[0.05, 0.07], finished_requests=[_finished(0.05, 0.6)]))
    second = parse_snapshot(metrics.render().decode(), t=102.0)
    stats = build_stats([first], second, interval_s=2.0)
    series = stats["series"]
    assert series["t"] == [102.0]
    assert series["prompt_tokens_per_s"] == [20.0] and series["generation_tokens_per_s"] == [10.0]
    assert series["running"] == [3.0] and series["waiting"] == [2.0] and series["kv_cache_usage"] == [0.5]
    assert series["prefix_cache_hit_rate"] == [0.25] and series["requests_per_s"] == [0.5]
    assert 0.04 < series["ttft_p50"][0] < 0.08
    assert stats["current"]["waiting_by_reason"] == {"capacity": 2.0, "deferred": 0.0}
    assert stats["totals"]["finished_by_reason"]["length"] == 1.0
    assert stats["latency"]["ttft"]["count"] == 2.0 and stats["latency"]["e2e"]["count"] == 1.0


def test_basic_auth_takes_the_key_as_password_on_dashboard_paths_only():
    header = b"Basic " + base64.b64encode(b"whoever:sk-1")
    assert basic_auth_matches(header, "sk-1")
    assert not basic_auth_matches(header, "sk-2")
    assert not basic_auth_matches(b"Bearer sk-1", "sk-1")
    assert not basic_auth_matches(b"Basic !!!", "sk-1")
    assert is_dashboard_path("/dashboard") and is_dashboard_path("/dashboard/stats")
    assert not is_dashboard_path("/dashboards") and not is_dashboard_path("/v1/models")


def test_request_tracer_makes_one_span_per_request_with_genai_attributes():
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from sluice.tracing import RequestTracer, make_tracer_provider

    exporter = InMemorySpanExporter()
    tracer = RequestTracer(make_tracer_provider("http://unused", span_exporter=exporter), "m", detailed=True)
    second_child = _finished(0.05, 0.6)
    second_child.n = 0  # the second completion of an n = 2 request: no span of its own
    tracer.record(SchedulerStats(num_running_reqs=1),
                  IterationStats(num_generation_tokens=1, step_start_time=0.5,
                                 finished_requests=[_finished(0.05, 0.6), second_child]))
    tracer.shutdown()
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert sorted(spans) == ["llm_request", "llm_step"]
    attrs = spans["llm_request"].attributes
    assert attrs["gen_ai.request.model"] == "m" and attrs["gen_ai.usage.input_tokens"] == 10
    assert attrs["gen_ai.latency.time_to_first_token"] == 0.05 and attrs["gen_ai.response.finish_reasons"] == (
        "length",)
    assert spans["llm_step"].attributes["sluice.scheduler.running"] == 1
