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
from sluice.engine.async_engine import AsyncLLM
from sluice.engine.startup import process_age_seconds
from sluice.metrics import PrometheusStatLogger

logger = logging.getLogger("sluice.server")


def add_cli_args(group: Any) -> None:
    group.add_argument("--disable-dashboard", action="store_true",
                       help="do not serve the live dashboard at /dashboard (and its JSON at /dashboard/stats)")


def engine_info(engine: AsyncLLM) -> dict[str, Any]:
    """What the dashboard shows about the engine: its resolved config (KV cache sized) and what the core
    reported when it became ready (engine/client.py's contract, in process or not)."""
    config, core_info = engine.config, engine.engine.engine_core.info
    return {"model": config.model.served_model_name, "device": config.model.device,
            "dtype": config.model.dtype, "version": __version__, "healthy": engine.is_healthy,
            "max_model_len": config.max_model_len, "num_kv_blocks": config.cache.num_blocks,
            "block_size": config.cache.block_size, "max_num_seqs": config.scheduler.max_num_seqs,
            "startup_seconds": dict(core_info.startup_seconds)}


def install_observability(app: FastAPI, args: argparse.Namespace, engine: AsyncLLM,
                          metrics: PrometheusStatLogger) -> None:
    if not args.disable_dashboard:
        from sluice.entrypoints.openai.dashboard import install_dashboard
        install_dashboard(app, metrics.render, lambda: engine_info(engine))
    if engine.engine.tracer is not None:
        from sluice.tracing import TraceContextMiddleware
        app.add_middleware(TraceContextMiddleware)
    ready = process_age_seconds()
    if ready is not None:
        metrics.log_startup_phase("ready", ready)
        logger.info("ready to serve %.1f s after the process started", ready)
