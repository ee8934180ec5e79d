"""Seeing the engine, end to end on one real `sluice serve`: vLLM's metric set moving under load, OpenTelemetry
spans reaching an in-process OTLP receiver with the caller's trace id, the Grafana example naming only exported
series, and the /dashboard page in a real headless Chromium (this one runs last: it stops the server)."""
from __future__ import annotations

import base64
import gzip
import json
import os
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.entrypoints.headless_chromium import HeadlessChromium, ensure_chromium
from tests.entrypoints.server_utils import REPO_ROOT, RemoteServer
from tests.tiny_models import save_tiny_model

trace_service_pb2 = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2")

API_KEY = "sk-observe"
MODEL = "tiny"
NUM_KV_BLOCKS = 20  # 320 tokens: four 70-token requests of 60 more tokens do not fit at once -> preemptions
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"
GRAFANA_JSON = REPO_ROOT / "examples" / "grafana" / "sluice.json"
# Where to keep a copy of the dashboard screenshot (for a look at it), if anywhere.
SCREENSHOT_COPY_ENV = "SLUICE_DASHBOARD_SCREENSHOT"


class OTLPReceiver:
    """An OTLP/HTTP traces endpoint on 127.0.0.1 that keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                for resource_spans in request.resource_spans:
                    for scope_spans in resource_spans.scope_spans:
                        receiver.spans.extend(scope_spans.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, predicate, timeout: float = 30.0) -> list:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [span for span in list(self.spans) if predicate(span)]
            if found:
                return found
            time.sleep(0.1)
        raise AssertionError(f"no such span in {len(self.spans)} received")


@pytest.fixture(scope="module")
def receiver():
    r = OTLPReceiver()
    yield r
    r.server.shutdown()


@pytest.fixture(scope="module")
def server(tmp_path_factory, receiver):
    model = save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))
    srv = RemoteServer(model, ["--served-model-name", MODEL, "--max-model-len", "192", "--block-size", "16",
                               "--num-kv-blocks", str(NUM_KV_BLOCKS), "--max-num-seqs", "8", "--kv-cache-metrics",
                               "--kv-cache-metrics-sample", "1.0", "--otlp-traces-endpoint", receiver.url,
                               "--collect-detailed-traces", "all"],
                       api_key=API_KEY, env={"OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_SERVICE_NAME": "sluice-test"})
    yield srv
    srv.stop()


def families(server: RemoteServer) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(httpx.get(server.url("/metrics")).text)}


def complete(server: RemoteServer, prompt: list[int], max_tokens: int, headers: dict | None = None, **extra) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, **extra}
    response = httpx.post(server.url("/v1/completions"), json=body, timeout=120,
                          headers={**server.headers(), **(headers or {})})
    assert response.status_code == 200, response.text
    return response.json()


def test_every_metric_is_exported_and_moves_under_load(server):
    before = server.metrics()
    prompts = [[(7 * i + j) % 300 + 3 for j in range(70)] for i in range(4)]
    with ThreadPoolExecutor(4) as pool:  # four at once in a 20-block cache: preemptions and waiting
        outs = list(pool.map(lambda p: complete(server, p, 60), prompts))
    complete(server, prompts[0], 5, n=2)  # a prefix hit, n = 2
    after = server.metrics()

    def moved(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    prompt_tokens = sum(o["usage"]["prompt_tokens"] for o in outs) + 2 * 70  # per completion, as generation
    assert moved("sluice:request_prompt_tokens_sum") == prompt_tokens
    assert moved("sluice:request_generation_tokens_sum") == 4 * 60 + 2 * 5
    assert moved("sluice:request_prompt_tokens_count") == 6  # one per completion (n = 2 gives two)
    assert moved("sluice:request_params_n_count") == 5 and moved("sluice:request_params_n_sum") == 4 + 2
    assert moved("sluice:request_params_max_tokens_sum") == 4 * 60 + 5
    assert moved("sluice:request_success_total[finished_reason=length]") == 6
    assert moved("sluice:iteration_tokens_total_sum") == moved("sluice:prompt_tokens_total") + moved(
        "sluice:generation_tokens_total")
    assert moved("sluice:iteration_tokens_total_count") > 60  # a step per decode token at least
    for phase in ("queue", "prefill", "decode", "inference"):
        assert moved(f"sluice:request_{phase}_time_seconds_count") == 6
    # Queue time ends at first scheduling now, before the first token: strictly less than TTFT in total.
    assert moved("sluice:request_queue_time_seconds_sum") < moved("sluice:time_to_first_token_seconds_sum")
    assert moved("sluice:request_inference_time_seconds_sum") == pytest.approx(
        moved("sluice:request_prefill_time_seconds_sum") + moved("sluice:request_decode_time_seconds_sum"), rel=1e-6)
    assert moved("sluice:num_preemptions_total") > 0
    assert moved("sluice:prefix_cache_hits_total") > 0
    # --kv-cache-metrics with every block sampled: preemptions and reuse make evictions and reuse gaps.
    assert moved("sluice:kv_block_lifetime_seconds_count") > 0
    assert moved("sluice:kv_block_idle_before_evict_seconds_count") > 0
    assert moved("sluice:kv_block_reuse_gap_seconds_count") > 0
    assert after["sluice:num_requests_waiting_by_reason[reason=capacity]"] == 0  # idle again
    assert "sluice:num_requests_waiting_by_reason[reason=deferred]" in after
    info = families(server)["sluice:cache_config_info"].samples[0].labels
    assert info["num_gpu_blocks"] == str(NUM_KV_BLOCKS) and info["block_size"] == "16"
    phases = {s.labels["phase"]: s.value for s in families(server)["sluice:engine_startup_seconds"].samples}
    assert {"config", "weights", "profiling", "kv_cache", "graph_capture", "ready"} <= set(phases)
    assert phases["ready"] > phases["weights"] > 0


def test_request_span_reaches_the_otlp_endpoint_as_a_child_of_the_callers_trace(server, receiver):
    out = complete(server, [5, 6, 7, 8, 9], 4, headers={"traceparent": f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"})
    spans = receiver.wait_for(lambda s: s.name == "llm_request" and s.trace_id.hex() == TRACE_ID)
    assert len(spans) == 1
    span = spans[0]
    assert span.parent_span_id.hex() == PARENT_SPAN_ID
    attrs = {a.key: a.value for a in span.attributes}
    assert attrs["gen_ai.request.model"].string_value == MODEL
    assert attrs["gen_ai.usage.input_tokens"].int_value == out["usage"]["prompt_tokens"] == 5
    assert attrs["gen_ai.usage.output_tokens"].int_value == 4
    assert [v.string_value for v in attrs["gen_ai.response.finish_reasons"].array_value.values] == ["length"]
    ttft, queue = attrs["gen_ai.latency.time_to_first_token"].double_value, attrs["gen_ai.latency.time_in_queue"]
    assert 0 <= queue.double_value <= ttft <= attrs["gen_ai.latency.e2e"].double_value
    assert span.end_time_unix_nano > span.start_time_unix_nano
    # A request without traceparent gets a root span of its own; --collect-detailed-traces adds step spans.
    complete(server, [9, 8, 7], 2)
    roots = receiver.wait_for(lambda s: s.name == "llm_request" and not s.parent_span_id)
    assert all(s.trace_id.hex() != TRACE_ID for s in roots)
    assert receiver.wait_for(lambda s: s.name == "llm_step")


def test_grafana_example_uses_only_metrics_the_server_exports(server):
    dashboard = json.loads(GRAFANA_JSON.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    referenced = {name for expr in exprs for name in re.findall(r"sluice:[a-z0-9_]+", expr)}
    exported = set()
    for family in families(server).values():
        exported |= {sample.name for sample in family.samples} | {family.name}
    assert referenced and referenced <= exported, sorted(referenced - exported)
    titles = {p["title"] for p in dashboard["panels"] if p["type"] == "row"}
    assert titles == {"Throughput", "Latency", "KV cache and preemptions", "Queue"}


def test_dashboard_needs_the_key_and_takes_it_as_basic_auth(server):
    assert httpx.get(server.url("/dashboard")).status_code == 401
    assert httpx.get(server.url("/dashboard")).headers["www-authenticate"].startswith("Basic")
    assert httpx.get(server.url("/dashboard"), auth=("anyone", "wrong")).status_code == 401
    assert httpx.get(server.url("/dashboard"), auth=("anyone", API_KEY)).status_code == 200
    stats = httpx.get(server.url("/dashboard/stats"), headers=server.headers()).json()
    assert stats["engine"]["num_kv_blocks"] == NUM_KV_BLOCKS and stats["totals"]["requests_finished"] > 0
    # Basic auth opens the dashboard only, never the API.
    assert httpx.get(server.url("/v1/models"), auth=("anyone", API_KEY)).status_code == 401


def test_dashboard_renders_live_in_headless_chromium_and_reports_a_stopped_server(server, tmp_path):
    browser = HeadlessChromium(ensure_chromium())
    try:
        browser.set_headers({"Authorization": "Basic " + base64.b64encode(f"me:{API_KEY}".encode()).decode()})
        browser.navigate(server.url("/dashboard"))
        browser.wait_for("document.getElementById('status')?.dataset.state === 'live'")
        finished_before = int(browser.wait_for("document.getElementById('tile-finished').textContent"))
        charts = browser.evaluate("[...document.querySelectorAll('canvas')].map(c => [c.id, c.width, c.height, "
                                  "Number(c.dataset.points || 0)])")
        assert len(charts) == 7 and all(w > 100 and h > 100 for _, w, h, _ in charts)
        # Each chart draws something: its lines have points, and its pixels are not all one colour.
        assert all(points > 0 for *_, points in charts), charts
        assert browser.evaluate("(() => { const c = document.getElementById('chart-requests');"
                                " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
                                " return new Set(Array.from({length: d.length / 4}, (_, i) => d[4 * i])).size; })()"
                                ) > 3
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda i: complete(server, [11 + i, 12, 13, 14], 12), range(3)))
        browser.wait_for(f"Number(document.getElementById('tile-finished').textContent) >= {finished_before + 3}")
        browser.wait_for("document.querySelector('#latency-table tbody tr td:nth-child(2)')?.textContent !== '–'")
        time.sleep(2.5)  # one more poll so the charts carry the new requests
        browser.screenshot(str(tmp_path / "dashboard.png"))
        if os.environ.get(SCREENSHOT_COPY_ENV):
            shutil.copy(tmp_path / "dashboard.png", os.environ[SCREENSHOT_COPY_ENV])
        origins = {re.match(r"https?://[^/]+", url).group(0) for url in browser.requested_urls()
                   if url.startswith("http")}
        assert origins == {server.base_url}  # nothing from outside the server (no CDN)
        server.stop()
        banner = browser.wait_for("!document.getElementById('banner').hidden && "
                                  "document.getElementById('banner').textContent", timeout=15)
        assert "not answering" in banner
        assert browser.evaluate("document.getElementById('status').dataset.state") == "down"
        browser.screenshot(str(tmp_path / "dashboard-server-stopped.png"))
    finally:
        browser.close()
