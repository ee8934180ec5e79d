"""`sluice serve`: the OpenAI-compatible HTTP server (FastAPI + uvicorn) over AsyncLLM.

    sluice serve path/to/model --port 8000 --api-key sk-... --served-model-name my-model

Routes: /v1/completions, /v1/chat/completions, /v1/models, /tokenize, /detokenize,
/health, /version, /metrics, /dashboard (observability.py). Graceful shutdown: the first SIGTERM/SIGINT starts a drain
(new requests get 503, /health turns 503), in-flight requests get up to
``--shutdown-timeout`` seconds, the rest are aborted, and the process exits 0. A second
signal exits at once.

Process split (``--process-split``, the default; ``--no-process-split`` keeps the core on a thread): the
EngineCore (scheduler + model runner) runs in its own process (engine/core_proc.py) and this process keeps HTTP,
tokenization, detokenization and streaming. If the engine dies (the core process exits, or the engine thread
fails), /health turns 503, in-flight streams get an error event, and after ``DEAD_ENGINE_GRACE_S`` the server
exits with status 1 instead of hanging. ``--api-server-count N`` runs N such API server processes in front of
one engine core, on one port (api_server_pool.py).
"""
from __future__ import annotations

import argparse
import logging
import os
import resource
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from sluice import __version__
from sluice.config import EngineArgs
from sluice.engine.async_engine import AsyncLLM
from sluice.engine.gc_heap import freeze_startup_heap
from sluice.entrypoints.openai.errors import OpenAIError, install_exception_handlers
from sluice.entrypoints.openai.middleware import ServerGuard
from sluice.entrypoints.openai.observability import add_cli_args as add_observability_args
from sluice.entrypoints.openai.observability import install_observability
from sluice.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                                TokenizeRequest)
from sluice.entrypoints.openai.sampling import ServingLimits
from sluice.entrypoints.openai.serving_completion import OpenAIServingCompletion
from sluice.entrypoints.openai.serving_engine import ServingConfig
from sluice.entrypoints.openai.serving_models import OpenAIServingModels
from sluice.engine.stats import LoggingStatLogger
from sluice.metrics import METRICS_CONTENT_TYPE, PrometheusStatLogger

logger = logging.getLogger("sluice.server")

DEAD_ENGINE_GRACE_S = 1.0  # a dead engine's server keeps answering 503 this long (health checks see it), then exits
EXIT_ENGINE_DEAD = 1


@dataclass
class ServerState:
    """What the routes share; ``draining`` flips on the first shutdown signal."""

    engine: AsyncLLM
    metrics: PrometheusStatLogger
    draining: bool = False


def build_app(engine: AsyncLLM, config: ServingConfig, metrics: PrometheusStatLogger,
              api_key: str | None = None, max_body_bytes: int = 10 * 2**20,
              chat_template: str | None = None) -> tuple[FastAPI, ServerGuard, ServerState]:
    """The ASGI app (wrapped in ServerGuard), the guard (for its in-flight count) and the shared state."""
    state = ServerState(engine, metrics)
    tokenizer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sluice-tokenizer")
    completions = OpenAIServingCompletion(engine, config, tokenizer_pool)
    chat = OpenAIServingModels(engine, config, tokenizer_pool, default_chat_template=chat_template)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
        yield
        engine.shutdown()
        tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="sluice", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    install_exception_handlers(app)

    @app.post("/v1/completions")
    async def create_completion(request: CompletionRequest, raw_request: Request) -> Any:
        return await completions.create_completion(request, raw_request)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Any:
        return await chat.create_chat_completion(request, raw_request)

    @app.get("/v1/models")
    async def list_models() -> Any:
        return JSONResponse(chat.list_models().model_dump())

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest) -> Any:
        return JSONResponse((await chat.tokenize(request)).model_dump())

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest) -> Any:
        return JSONResponse((await chat.detokenize(request)).model_dump())

    @app.get("/health")
    async def health() -> Response:
        if state.draining:
            return OpenAIError("the server is draining", 503, code="draining").response()
        if not engine.is_healthy:
            return OpenAIError("the engine is dead", 503, code="engine_dead").response()
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> Any:
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    guard = ServerGuard(app, api_key, max_body_bytes, is_draining=lambda: state.draining)
    return app, guard, state


class DrainingServer(uvicorn.Server):
    """uvicorn, with a drain before exit instead of its own abrupt signal handling."""

    def __init__(self, config: uvicorn.Config, state: ServerState, guard: ServerGuard,
                 shutdown_timeout: float) -> None:
        super().__init__(config)
        self.state, self.guard, self.shutdown_timeout = state, guard, shutdown_timeout
        self._drain_deadline = 0.0
        self._engine_dead_since: float | None = None
        self.exit_code = 0

    def handle_exit(self, sig: int, frame: Any) -> None:
        # Runs in the signal handler: only flips flags; on_tick does the work. Unlike uvicorn's own
        # handler it does not re-raise the signal afterwards, so a drained server exits 0.
        if self.state.draining:
            self.should_exit = True  # second signal: stop waiting
            return
        self.state.draining = True
        self._drain_deadline = time.monotonic() + self.shutdown_timeout

    async def on_tick(self, counter: int) -> bool:
        if self.state.engine.errored and not self.should_exit:
            self._exit_after_engine_death()
        if self.state.draining and not self.should_exit:
            if self.guard.num_in_flight == 0 or time.monotonic() >= self._drain_deadline:
                num_aborted = self.state.engine.abort_all("the server is shutting down")
                logger.info("drain finished; %d request(s) aborted", num_aborted)
                self.should_exit = True
        return await super().on_tick(counter)

    def _exit_after_engine_death(self) -> None:
        now = time.monotonic()
        if self._engine_dead_since is None:
            self._engine_dead_since = now
            logger.error("the engine died; /health answers 503 and the server exits in %.1f s", DEAD_ENGINE_GRACE_S)
        elif now - self._engine_dead_since >= DEAD_ENGINE_GRACE_S:
            self.exit_code = EXIT_ENGINE_DEAD
            self.should_exit = True


# ---- command line ------------------------------------------------------------------------------
def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server",
                                   description="Serve a model over the OpenAI API (completions, chat, models).")
    parser.add_argument("model", nargs="?", default=None, help=EngineArgs._HELP["model"])
    EngineArgs.add_cli_args(parser, model_positional=True)
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="0.0.0.0", help="address to bind")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--api-key", default=os.environ.get("SLUICE_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 routes (default: $SLUICE_API_KEY)")
    server.add_argument("--chat-template", default=None, help="chat template (Jinja text or file) overriding the model's")
    server.add_argument("--enable-log-requests", action="store_true", help="log every request's prompt and params")
    server.add_argument("--max-log-len", type=int, default=None,
                        help="characters of prompt and prompt token ids to log (default: all)")
    server.add_argument("--shutdown-timeout", type=float, default=10.0,
                        help="seconds in-flight requests get to finish after SIGTERM before they are aborted")
    server.add_argument("--max-num-queued-reqs", type=int, default=None,
                        help="beyond this many waiting requests, new ones get 503 (default: unbounded)")
    server.add_argument("--max-n", type=int, default=128, help="largest n a request may ask for")
    server.add_argument("--max-request-body-bytes", type=int, default=10 * 2**20, help="larger bodies get 413")
    server.add_argument("--process-split", action=argparse.BooleanOptionalAction, default=True,
                        help="run the engine core (scheduler + model runner) in its own process; "
                             "--no-process-split keeps it on a thread of the API server")
    server.add_argument("--api-server-count", type=int, default=1,
                        help="API server processes (HTTP, tokenization, detokenization, streaming) sharing one "
                             "engine core and one port; more than 1 needs --process-split")
    server.add_argument("--uvicorn-log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug", "trace"])
    server.add_argument("--disable-uvicorn-access-log", action="store_true")
    add_observability_args(server)
    parser.set_defaults(func=run_server)
    return parser


def run_server(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    validate_server_args(args)
    raise_open_files_limit()
    engine_args = engine_args_from(args)
    if args.api_server_count > 1:
        from sluice.entrypoints.openai.api_server_pool import run_api_server_pool
        return run_api_server_pool(args, engine_args)
    model_config = _peek_model_config(engine_args)
    metrics = PrometheusStatLogger(model_config.served_model_name)
    engine = AsyncLLM.from_engine_args(engine_args, stat_loggers=server_stat_loggers(engine_args, metrics),
                                       max_num_queued_reqs=args.max_num_queued_reqs,
                                       process_split=args.process_split)
    return serve(args, engine_args, engine, metrics)


def raise_open_files_limit(target: int = 65536) -> None:
    """One socket per connection: a benchmark at rate inf opens a thousand, past a common default limit of 1024.
    The soft limit goes up to ``target`` (never above the hard limit, never down); API servers inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = target if hard == resource.RLIM_INFINITY else min(target, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def validate_server_args(args: argparse.Namespace) -> None:
    if args.max_n < 1 or (args.max_num_queued_reqs is not None and args.max_num_queued_reqs < 0):
        raise ValueError("--max-n must be at least 1 and --max-num-queued-reqs non-negative")
    if args.api_server_count < 1:
        raise ValueError(f"--api-server-count must be at least 1, got {args.api_server_count}")
    if args.api_server_count > 1 and not args.process_split:
        raise ValueError(f"--api-server-count {args.api_server_count} needs the engine core in its own process, "
                         "which the API servers share: drop --no-process-split")


def engine_args_from(args: argparse.Namespace) -> EngineArgs:
    engine_args = EngineArgs.from_cli_args(args)
    engine_args.model = args.model
    engine_args.usage_context = "server"  # vLLM's serving batch defaults (smaller steps than offline)
    return engine_args


def server_stat_loggers(engine_args: EngineArgs, metrics: PrometheusStatLogger) -> list[Any]:
    return [metrics] if engine_args.disable_log_stats else [metrics, LoggingStatLogger()]


def serve(args: argparse.Namespace, engine_args: EngineArgs, engine: AsyncLLM, metrics: PrometheusStatLogger,
          sockets: list[socket.socket] | None = None, api_server_index: int | None = None,
          server_class: type[DrainingServer] = DrainingServer) -> int:
    """Runs the HTTP server over ``engine`` until it is shut down; returns the exit code.

    ``sockets``: listening sockets made by the caller (several API servers share one port); by default uvicorn
    binds ``--host``/``--port`` itself. ``api_server_index`` marks request ids with the API server that made
    them, so that ids of several API servers never collide.
    """
    model_config = engine.model_config
    limits = ServingLimits(max_model_len=model_config.max_model_len, vocab_size=model_config.vocab_size,
                           max_n=args.max_n, max_logprobs=engine_args.max_logprobs,
                           priority_scheduling=engine_args.scheduling_policy == "priority")
    config = ServingConfig([model_config.served_model_name], limits, args.enable_log_requests, args.max_log_len,
                           api_server_index=api_server_index)
    app, guard, state = build_app(engine, config, metrics, args.api_key, args.max_request_body_bytes,
                                  args.chat_template)
    install_observability(app, args, engine, metrics)  # /dashboard, traceparent, ready time
    uvicorn_config = uvicorn.Config(guard, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                                    access_log=not args.disable_uvicorn_access_log, timeout_graceful_shutdown=5,
                                    lifespan="on")
    logger.info("serving %s as %r on http://%s:%d", model_config.model, model_config.served_model_name,
                args.host, args.port)
    server = server_class(uvicorn_config, state, guard, args.shutdown_timeout)
    freeze_startup_heap()  # the engine thread's steps and the event loop never wait on a full collection
    server.run(sockets=sockets)
    return server.exit_code


def _peek_model_config(engine_args: EngineArgs) -> Any:
    """The model config, read before the engine so metrics carry the served name from the first step."""
    from sluice.models.model_config import ModelConfig
    return ModelConfig.from_engine_args(engine_args)
