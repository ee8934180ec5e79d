"""OpenTelemetry tracing: one span per request, W3C trace context from the caller, step spans on demand.

Off unless ``--otlp-traces-endpoint`` is given: then, and only then, the OpenTelemetry SDK is imported
(the optional extra ``sluice[otel]``), and ``RequestTracer`` joins the engine's stat loggers.

    HTTP request (traceparent: 00-<trace id>-<span id>-01)
      TraceContextMiddleware: extracts the context into the handler's contextvars
      AsyncLLM.add_request -> RequestTracer.capture_parent(request_id): remembers that context
      ... engine steps ...
      finished request -> RequestTracer.record: span "llm_request" (kind SERVER), child of the caller's span,
                          from arrival to finish, with the GenAI attributes below

The exporter follows the OTel environment: ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` (``http/protobuf``, the
default, or ``grpc`` with opentelemetry-exporter-otlp-proto-grpc installed), ``OTEL_EXPORTER_OTLP_TRACES_HEADERS``,
``_TIMEOUT``, ``_COMPRESSION``, ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``,
``OTEL_BSP_SCHEDULE_DELAY`` and the rest of the SDK's variables. ``--collect-detailed-traces`` adds one
"llm_step" span per engine step (the front end's view of it: tokens, batch, KV use).
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from sluice.config import ObservabilityConfig
from sluice.stats import FinishedRequestStats, IterationStats, SchedulerStats, StatLogger

INSTALL_HINT = "tracing needs the OpenTelemetry SDK: pip install 'sluice[otel]'"
SERVICE_NAME = "sluice"


class Attr:
    """Span attribute names: OTel GenAI semantic conventions, plus vLLM's names for what they lack."""
    SYSTEM = "gen_ai.system"
    OPERATION = "gen_ai.operation.name"
    REQUEST_ID = "gen_ai.request.id"
    REQUEST_MODEL = "gen_ai.request.model"
    RESPONSE_MODEL = "gen_ai.response.model"
    REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
    REQUEST_N = "gen_ai.request.n"
    INPUT_TOKENS = "gen_ai.usage.input_tokens"
    OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
    PROMPT_TOKENS = "gen_ai.usage.prompt_tokens"  # vLLM's (older semconv) names, kept for its dashboards
    COMPLETION_TOKENS = "gen_ai.usage.completion_tokens"
    CACHED_TOKENS = "gen_ai.usage.cache_read_input_tokens"
    FINISH_REASONS = "gen_ai.response.finish_reasons"
    TIME_TO_FIRST_TOKEN = "gen_ai.latency.time_to_first_token"
    TIME_IN_QUEUE = "gen_ai.latency.time_in_queue"
    E2E = "gen_ai.latency.e2e"
    PREFILL = "gen_ai.latency.time_in_model_prefill"
    DECODE = "gen_ai.latency.time_in_model_decode"
    INFERENCE = "gen_ai.latency.time_in_model_inference"
    PRIORITY = "sluice.request.priority"


def _exporter(endpoint: str) -> Any:
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                              os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"))
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            return OTLPSpanExporter(endpoint=endpoint)
        if protocol != "http/protobuf":
            raise ValueError(f"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL must be http/protobuf or grpc, got {protocol!r}")
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from e
    if not urlsplit(endpoint).path.strip("/"):  # a collector's base URL: the traces path is the spec's
        endpoint = endpoint.rstrip("/") + "/v1/traces"
    return OTLPSpanExporter(endpoint=endpoint)


def make_tracer_provider(endpoint: str, span_exporter: Any = None) -> Any:
    """A TracerProvider of our own (the global one stays the application's) exporting in batches."""
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from e
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", SERVICE_NAME)})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(span_exporter or _exporter(endpoint)))
    return provider


class RequestTracer(StatLogger):
    """A stat logger that turns finished requests (and, detailed, steps) into spans."""

    def __init__(self, provider: Any, model_name: str, detailed: bool = False) -> None:
        from opentelemetry import context, trace
        self._context, self._trace = context, trace
        self.provider = provider
        self.tracer = provider.get_tracer("sluice")
        self.model_name = model_name
        self.detailed = detailed
        self._parents: dict[str, Any] = {}  # request id -> caller's context (event loop writes, engine reads)
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: ObservabilityConfig, model_name: str) -> "RequestTracer | None":
        """The tracer ``config`` asks for, or None when tracing is off (nothing is imported then)."""
        if not config.otlp_traces_endpoint:
            return None
        return cls(make_tracer_provider(config.otlp_traces_endpoint), model_name,
                   detailed=bool(config.collect_detailed_traces))

    # ---- the request's caller ------------------------------------------------------------------
    def capture_parent(self, request_id: str) -> None:
        """Remembers the current context (a caller's traceparent) as the parent of this request's span."""
        parent = self._context.get_current()
        if self._trace.get_current_span(parent).get_span_context().is_valid:
            with self._lock:
                self._parents[request_id] = parent

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._parents.pop(request_id, None)

    # ---- stat logger ------------------------------------------------------------------------------
    def record(self, scheduler_stats: SchedulerStats, iteration_stats: IterationStats) -> None:
        now_mono = time.monotonic()
        to_wall_ns = time.time_ns() - int(now_mono * 1e9)  # monotonic -> epoch nanoseconds
        for finished in iteration_stats.finished_requests:
            if finished.n:  # one span per user request: its first completion carries it
                self._request_span(finished, now_mono, to_wall_ns)
        if self.detailed and iteration_stats.step_start_time and (
                iteration_stats.num_prompt_tokens or iteration_stats.num_generation_tokens
                or iteration_stats.finished_requests):
            self._step_span(scheduler_stats, iteration_stats, now_mono, to_wall_ns)

    def _request_span(self, finished: FinishedRequestStats, now_mono: float, to_wall_ns: int) -> None:
        with self._lock:
            parent = self._parents.pop(finished.request_id, None)
        span = self.tracer.start_span("llm_request", context=parent, kind=self._trace.SpanKind.SERVER,
                                      start_time=int(finished.arrival_time * 1e9) + to_wall_ns)
        attributes = {
            Attr.SYSTEM: SERVICE_NAME, Attr.OPERATION: "text_completion", Attr.REQUEST_ID: finished.request_id,
            Attr.REQUEST_MODEL: self.model_name, Attr.RESPONSE_MODEL: self.model_name,
            Attr.REQUEST_N: finished.n, Attr.INPUT_TOKENS: finished.num_prompt_tokens,
            Attr.OUTPUT_TOKENS: finished.num_generation_tokens, Attr.PROMPT_TOKENS: finished.num_prompt_tokens,
            Attr.COMPLETION_TOKENS: finished.num_generation_tokens, Attr.CACHED_TOKENS: finished.num_cached_tokens,
            Attr.FINISH_REASONS: [finished.finish_reason], Attr.TIME_IN_QUEUE: finished.queue_time,
            Attr.E2E: finished.e2e_latency, Attr.PREFILL: finished.prefill_time, Attr.DECODE: finished.decode_time,
            Attr.INFERENCE: finished.inference_time, Attr.PRIORITY: finished.priority,
        }
        if finished.max_tokens is not None:
            attributes[Attr.REQUEST_MAX_TOKENS] = finished.max_tokens
        if finished.ttft is not None:
            attributes[Attr.TIME_TO_FIRST_TOKEN] = finished.ttft
        span.set_attributes(attributes)
        span.end(end_time=int(now_mono * 1e9) + to_wall_ns)

    def _step_span(self, scheduler_stats: SchedulerStats, stats: IterationStats, now_mono: float,
                   to_wall_ns: int) -> None:
        span = self.tracer.start_span("llm_step", kind=self._trace.SpanKind.INTERNAL,
                                      start_time=int(stats.step_start_time * 1e9) + to_wall_ns)
        span.set_attributes({
            "sluice.step.prompt_tokens": stats.num_prompt_tokens,
            "sluice.step.generation_tokens": stats.num_generation_tokens,
            "sluice.step.finished_requests": len(stats.finished_requests),
            "sluice.scheduler.running": scheduler_stats.num_running_reqs,
            "sluice.scheduler.waiting": scheduler_stats.num_waiting_reqs,
            "sluice.kv_cache.usage": scheduler_stats.kv_cache_usage,
        })
        span.end(end_time=int(now_mono * 1e9) + to_wall_ns)

    def shutdown(self) -> None:
        """Flushes what is batched and stops the exporter."""
        self.provider.shutdown()


class TraceContextMiddleware:
    """ASGI: puts an incoming W3C ``traceparent`` (and ``tracestate``, baggage) into the request's context.

    Installed only when tracing is on; everything downstream of it in the same task sees the context.
    """

    def __init__(self, app: Any) -> None:
        from opentelemetry import context, propagate
        self.app, self._context, self._propagate = app, context, propagate

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        carrier = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope.get("headers", [])}
        token = self._context.attach(self._propagate.extract(carrier))
        try:
            await self.app(scope, receive, send)
        finally:
            self._context.detach(token)
