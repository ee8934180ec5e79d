"""What `sluice serve` adds to its app to be watched: the dashboard, traceparent propagation, the ready time.

One call from the server (``install_observability``) after the app is built: the /dashboard routes unless
``--disable-dashboard`` (entrypoints/openai/dashboard.py), the W3C trace-context middleware when tracing is
on (sluice/tracing.py), and the start-up line "ready to serve N s after the process started", also exported
as ``sluice:engine_startup_seconds{phase="ready"}``.
"""
from __future__ import annotations

import argparse
import logging
from typing import Any

from fastapi import FastAPI

from sluice import __version__
from sluice.engine.startup import process_age_seconds
from sluice.metrics import PrometheusStatLogger

logger = logging.getLogger("sluice.server")


def add_cli_args(group: Any) -> None:
    group.add_argument("--disable-dashboard", action="store_true",
                       help="do not serve the live dashboard at /dashboard (and its JSON at /dashboard/stats)")


def engine_info(engine: Any) -> dict[str, Any]:
    """What the dashboard shows about the engine (set once at start-up, read from any thread)."""
    model_config, core = engine.model_config, getattr(engine.engine, "core", None)
    cache = getattr(core, "cache_config", None)
    scheduler = getattr(core, "scheduler_config", None)
    return {"model": model_config.served_model_name, "device": str(model_config.device),
            "dtype": str(model_config.dtype), "version": __version__, "healthy": engine.is_healthy,
            "max_model_len": model_config.max_model_len,
            "num_kv_blocks": getattr(cache, "num_blocks", None), "block_size": getattr(cache, "block_size", None),
            "max_num_seqs": getattr(scheduler, "max_num_seqs", None),
            "startup_seconds": dict(getattr(core, "startup_seconds", {}) or {})}


def install_observability(app: FastAPI, args: argparse.Namespace, engine: Any,
                          metrics: PrometheusStatLogger) -> None:
    if not getattr(args, "disable_dashboard", False):
        from sluice.entrypoints.openai.dashboard import install_dashboard
        install_dashboard(app, metrics.render, lambda: engine_info(engine))
    if getattr(engine.engine, "tracer", None) is not None:
        from sluice.tracing import TraceContextMiddleware
        app.add_middleware(TraceContextMiddleware)
    ready = process_age_seconds()
    if ready is not None:
        metrics.log_startup_phase("ready", ready)
        logger.info("ready to serve %.1f s after the process started", ready)
