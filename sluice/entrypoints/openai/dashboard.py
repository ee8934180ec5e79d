"""The live dashboard: ``GET /dashboard`` (a static page, static/dashboard.*) and ``GET /dashboard/stats`` (JSON).

The page polls the JSON every two seconds and draws it on canvases; it needs nothing from outside the
server (no CDN), so it works offline. The JSON comes from ``MetricsHistory``: a daemon thread samples the
server's own Prometheus series every ``SAMPLE_INTERVAL_S`` (the merged view of every API server with
``--api-server-count``) and keeps ``WINDOW_S`` of snapshots; rates and latency percentiles are differences of
counters and histogram buckets between snapshots, computed like Prometheus' ``rate`` and ``histogram_quantile``.

    sampler thread:  metrics.render() -> parse -> Snapshot -> deque (WINDOW_S / SAMPLE_INTERVAL_S)
    GET /dashboard/stats:  deque -> per-interval rates, trailing-window percentiles, current gauges

With ``--api-key`` the routes sit behind the key like /v1 (ServerGuard): ``Authorization: Bearer KEY``, or,
for a browser, HTTP Basic auth with the key as password (any user name), which the guard accepts on
/dashboard paths only and asks for with a Basic challenge. ``--disable-dashboard`` leaves all of this out.
"""
from __future__ import annotations

import base64
import hmac
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Callable

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client.parser import text_string_to_metric_families

logger = logging.getLogger("sluice.dashboard")

DASHBOARD_PATH = "/dashboard"
SAMPLE_INTERVAL_S = 2.0
WINDOW_S = 600.0  # history the page can show
PERCENTILE_WINDOW_S = 30.0  # each latency point is the percentile over this trailing window
SUMMARY_WINDOW_S = 300.0  # the summary table's window
_STATIC = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
_HISTOGRAMS = {"ttft": "time_to_first_token_seconds", "itl": "inter_token_latency_seconds",
               "e2e": "e2e_request_latency_seconds", "queue": "request_queue_time_seconds"}
_GAUGES = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")
_COUNTERS = ("prompt_tokens", "generation_tokens", "prefix_cache_queries", "prefix_cache_hits", "num_preemptions")
BASIC_CHALLENGE = b'Basic realm="sluice dashboard", charset="UTF-8"'


# ---- auth (used by ServerGuard) -----------------------------------------------------------------------------
def is_dashboard_path(path: str) -> bool:
    return path == DASHBOARD_PATH or path.startswith(DASHBOARD_PATH + "/")


def basic_auth_matches(authorization: bytes, api_key: str) -> bool:
    """Whether ``Authorization: Basic base64(user:password)`` carries the API key as its password."""
    scheme, _, encoded = authorization.partition(b" ")
    if scheme.lower() != b"basic":
        return False
    try:
        _, _, password = base64.b64decode(encoded.strip(), validate=True).partition(b":")
    except ValueError:
        return False
    return hmac.compare_digest(password, api_key.encode())


# ---- sampling -----------------------------------------------------------------------------------------------
@dataclass(slots=True)
class Snapshot:
    """The server's series at one moment: sums over label sets other than those kept apart."""
    t: float  # time.time()
    gauges: dict[str, float] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)
    finished: dict[str, float] = field(default_factory=dict)  # finished_reason -> count
    waiting_by_reason: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # name -> [(le, count)]


def parse_snapshot(text: str, prefix: str = "sluice:", t: float | None = None) -> Snapshot:
    snap = Snapshot(time.time() if t is None else t)
    wanted_hist = {prefix + name: key for key, name in _HISTOGRAMS.items()}
    for family in text_string_to_metric_families(text):
        name = family.name
        if name.startswith(prefix) and name[len(prefix):] in _GAUGES:
            values = [s.value for s in family.samples]  # one per engine core under data parallelism
            key = name[len(prefix):]
            snap.gauges[key] = (sum(values) / len(values) if key == "kv_cache_usage_perc" and values
                                else sum(values))
        elif name.startswith(prefix) and name[len(prefix):] in _COUNTERS:
            snap.counters[name[len(prefix):]] = sum(s.value for s in family.samples if s.name.endswith("_total"))
        elif name == prefix + "request_success":
            for s in family.samples:
                if s.name.endswith("_total"):
                    reason = s.labels.get("finished_reason", "")
                    snap.finished[reason] = snap.finished.get(reason, 0.0) + s.value
        elif name == prefix + "num_requests_waiting_by_reason":
            for s in family.samples:
                reason = s.labels.get("reason", "")
                snap.waiting_by_reason[reason] = snap.waiting_by_reason.get(reason, 0.0) + s.value
        elif name in wanted_hist:
            buckets: dict[float, float] = {}
            for s in family.samples:
                if s.name.endswith("_bucket"):
                    le = float(s.labels["le"])
                    buckets[le] = buckets.get(le, 0.0) + s.value
            snap.histograms[wanted_hist[name]] = sorted(buckets.items())
    return snap


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' estimate: linear interpolation inside the bucket holding the q-th observation."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_le, lower_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return lower_le  # beyond the largest finite edge: that edge is the best bound
            if count == lower_count:
                return le
            return lower_le + (le - lower_le) * (rank - lower_count) / (count - lower_count)
        lower_le, lower_count = le, count
    return lower_le


def _bucket_delta(new: list[tuple[float, float]], old: list[tuple[float, float]] | None) -> list[tuple[float, float]]:
    if not old or len(old) != len(new):
        return new
    return [(le, max(0.0, count - old_count)) for (le, count), (_, old_count) in zip(new, old)]


class MetricsHistory:
    """Snapshots of the Prometheus series over the last ``window_s``, taken by a daemon thread."""

    def __init__(self, render: Callable[[], bytes], interval_s: float = SAMPLE_INTERVAL_S,
                 window_s: float = WINDOW_S) -> None:
        self._render = render
        self.interval_s = interval_s
        self._snapshots: deque[Snapshot] = deque(maxlen=int(window_s / interval_s) + 1)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sluice-dashboard-sampler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def sample(self) -> None:
        snap = parse_snapshot(self._render().decode())
        with self._lock:
            self._snapshots.append(snap)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - a bad sample must not end the sampling
                logger.exception("dashboard sampling failed")
            self._stop.wait(self.interval_s)

    def snapshots(self) -> list[Snapshot]:
        with self._lock:
            return list(self._snapshots)


def build_stats(snapshots: list[Snapshot], latest: Snapshot, interval_s: float = SAMPLE_INTERVAL_S) -> dict[str, Any]:
    """The JSON the page draws: time series, current values, totals and latency percentiles."""
    snaps = [s for s in snapshots if s.t < latest.t - 1e-6] + [latest]
    series: dict[str, list[Any]] = {key: [] for key in (
        "t", "running", "waiting", "kv_cache_usage", "prefix_cache_hit_rate", "preemptions_per_s",
        "prompt_tokens_per_s", "generation_tokens_per_s", "requests_per_s",
        "ttft_p50", "ttft_p99", "itl_p50", "itl_p99", "e2e_p50", "e2e_p99")}
    lookback = max(1, int(round(PERCENTILE_WINDOW_S / interval_s)))
    for i in range(1, len(snaps)):
        new, old = snaps[i], snaps[i - 1]
        dt = max(new.t - old.t, 1e-6)
        rate = {name: max(0.0, new.counters.get(name, 0.0) - old.counters.get(name, 0.0)) / dt for name in _COUNTERS}
        series["t"].append(round(new.t, 3))
        series["running"].append(new.gauges.get("num_requests_running", 0.0))
        series["waiting"].append(new.gauges.get("num_requests_waiting", 0.0))
        series["kv_cache_usage"].append(new.gauges.get("kv_cache_usage_perc", 0.0))
        queries = rate["prefix_cache_queries"]
        series["prefix_cache_hit_rate"].append(rate["prefix_cache_hits"] / queries if queries else None)
        series["preemptions_per_s"].append(rate["num_preemptions"])
        series["prompt_tokens_per_s"].append(rate["prompt_tokens"])
        series["generation_tokens_per_s"].append(rate["generation_tokens"])
        series["requests_per_s"].append(max(0.0, sum(new.finished.values()) - sum(old.finished.values())) / dt)
        base = snaps[max(0, i - lookback)]
        for key in ("ttft", "itl", "e2e"):
            delta = _bucket_delta(new.histograms.get(key, []), base.histograms.get(key))
            series[f"{key}_p50"].append(histogram_quantile(0.5, delta))
            series[f"{key}_p99"].append(histogram_quantile(0.99, delta))
    summary_base = next((s for s in snaps if s.t >= latest.t - SUMMARY_WINDOW_S), snaps[0])
    latency = {}
    for key in _HISTOGRAMS:
        delta = _bucket_delta(latest.histograms.get(key, []), summary_base.histograms.get(key)
                              if summary_base is not latest else None)
        latency[key] = {"count": delta[-1][1] if delta else 0.0,
                        **{f"p{int(q * 100)}": histogram_quantile(q, delta) for q in (0.5, 0.9, 0.99)}}
    queries, hits = latest.counters.get("prefix_cache_queries", 0.0), latest.counters.get("prefix_cache_hits", 0.0)
    return {
        "now": latest.t, "interval_s": interval_s, "summary_window_s": SUMMARY_WINDOW_S, "series": series,
        "current": {"running": latest.gauges.get("num_requests_running", 0.0),
                    "waiting": latest.gauges.get("num_requests_waiting", 0.0),
                    "waiting_by_reason": latest.waiting_by_reason,
                    "kv_cache_usage": latest.gauges.get("kv_cache_usage_perc", 0.0),
                    "prefix_cache_hit_rate": hits / queries if queries else None},
        "totals": {"prompt_tokens": latest.counters.get("prompt_tokens", 0.0),
                   "generation_tokens": latest.counters.get("generation_tokens", 0.0),
                   "preemptions": latest.counters.get("num_preemptions", 0.0),
                   "requests_finished": sum(latest.finished.values()), "finished_by_reason": latest.finished},
        "latency": latency,
    }


# ---- routes -------------------------------------------------------------------------------------------------
def _static_text(name: str) -> str:
    return resources.files("sluice.entrypoints.openai").joinpath("static", name).read_text(encoding="utf-8")


def install_dashboard(app: FastAPI, render: Callable[[], bytes], engine_info: Callable[[], dict[str, Any]],
                      history: MetricsHistory | None = None) -> MetricsHistory:
    """Adds /dashboard, its static files and /dashboard/stats to ``app``; starts the sampler."""
    history = history or MetricsHistory(render)
    history.start()
    page = _static_text("dashboard.html")
    assets = {name: (_static_text(name), media_type) for name, media_type in _STATIC.items()}

    @app.get(DASHBOARD_PATH, include_in_schema=False)
    async def dashboard_page() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers={"cache-control": "no-cache"})

    @app.get(DASHBOARD_PATH + "/static/{name}", include_in_schema=False)
    async def dashboard_asset(name: str) -> Response:
        if name not in assets:
            return JSONResponse({"error": {"message": f"no dashboard file {name!r}", "code": 404}}, 404)
        text, media_type = assets[name]
        return Response(text, media_type=media_type, headers={"cache-control": "no-cache"})

    @app.get(DASHBOARD_PATH + "/stats", include_in_schema=False)
    async def dashboard_stats() -> Any:
        latest = parse_snapshot(render().decode())  # the newest point is always "now"
        stats = build_stats(history.snapshots(), latest, history.interval_s)
        stats["engine"] = engine_info()
        return JSONResponse(stats, headers={"cache-control": "no-store"})

    return history
