"""`sluice serve`: the OpenAI-compatible HTTP server (FastAPI + uvicorn) over AsyncLLM.

    sluice serve path/to/model --port 8000 --api-key sk-... --served-model-name my-model

Routes: /v1/completions, /v1/chat/completions, /v1/embeddings, /v1/models, /v1/models/{id}, /tokenize,
/detokenize, /health, /ping, /version, /metrics, /docs, /dashboard (observability.py). Graceful shutdown: the
first SIGTERM/SIGINT starts a drain
(new requests get 503, /health turns 503), in-flight requests get up to
``--shutdown-timeout`` seconds, the rest are aborted, and the process exits 0. A second
signal aborts every request at once (each stream ends with an error event and ``[DONE]``) and exits.

Process split (``--process-split``, the default; ``--no-process-split`` keeps the core on a thread): the
EngineCore (scheduler + model runner) runs in its own process (engine/core_proc.py) and this process keeps HTTP,
tokenization, detokenization and streaming. If the engine dies (the core process exits, or the engine thread
fails), /health turns 503, in-flight streams get an error event, and after ``DEAD_ENGINE_GRACE_S`` the server
exits with status 1 instead of hanging. ``--api-server-count N`` runs N such API server processes in front of
one engine core, on one port (api_server_pool.py).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

from sluice import __version__
from sluice.config import EngineArgs, EngineConfig, create_engine_config
from sluice.engine.async_engine import AsyncLLM
from sluice.engine.client import CoreAttachment
from sluice.engine.core_proc import CoreAddresses
from sluice.engine.gc_heap import freeze_startup_heap
from sluice.entrypoints.openai.errors import OpenAIError, install_exception_handlers
from sluice.entrypoints.openai.middleware import ServerGuard
from sluice.entrypoints.openai.observability import add_cli_args as add_observability_args
from sluice.entrypoints.openai.observability import install_observability
from sluice.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                                TokenizeRequest)
from sluice.entrypoints.openai.sampling import ServingLimits, generation_config_defaults, prompt_chars_limit
from sluice.entrypoints.openai.serving_chat import OpenAIServingChat
from sluice.entrypoints.openai.serving_completion import OpenAIServingCompletion
from sluice.entrypoints.openai.serving_embedding import register_embedding_route
from sluice.entrypoints.openai.serving_engine import ServingConfig
from sluice.entrypoints.openai.serving_lora import (LoRAModules, add_lora_args, install_lora_routes,
                                                    runtime_updates_enabled)
from sluice.entrypoints.openai.serving_models import OpenAIServingModels
from sluice.entrypoints.openai.render_pool import ChatRenderPool
from sluice.entrypoints.openai.tool_calling import ToolCallConfig
from sluice.entrypoints.openai.tool_parsers import TOOL_PARSERS
from sluice.entrypoints.openai.api_server_pool import DEAD_ENGINE_GRACE_S, run_api_server_pool
from sluice.engine.stats import LoggingStatLogger
from sluice.entrypoints.utils import check_device_available
from sluice.tokenizer import get_chat_template
from sluice.metrics import METRICS_CONTENT_TYPE, PrometheusStatLogger

logger = logging.getLogger("sluice.server")

EXIT_ENGINE_DEAD = 1
FORCED_EXIT_FLUSH_S = 0.5  # after a second signal, aborted streams get this long to send their error and [DONE]
TOKENIZER_POOL_WORKERS = 4  # one slow tokenization occupies one worker, not every request's


@dataclass
class ServerState:
    """What the routes share; ``draining`` flips on the first shutdown signal."""

    engine: AsyncLLM
    metrics: PrometheusStatLogger
    draining: bool = False


def build_app(engine: AsyncLLM, config: ServingConfig, metrics: PrometheusStatLogger,
              api_key: str | None = None, max_body_bytes: int = 10 * 2**20,
              chat_template: str | None = None, allowed_origins: list[str] | None = None,
              root_path: str = "") -> tuple[FastAPI, ServerGuard, ServerState]:
    """The ASGI app (wrapped in ServerGuard), the guard (for its in-flight count) and the shared state.

    ``chat_template``: the server's template as Jinja text (a --chat-template file is read once, at start)."""
    state = ServerState(engine, metrics)
    tokenizer_pool = ThreadPoolExecutor(max_workers=TOKENIZER_POOL_WORKERS, thread_name_prefix="sluice-tokenizer")
    completions = OpenAIServingCompletion(engine, config, tokenizer_pool)
    render_pool = ChatRenderPool()  # chat templates render in processes of their own
    chat = OpenAIServingChat(engine, config, tokenizer_pool, default_chat_template=chat_template,
                             render_pool=render_pool)
    models = OpenAIServingModels(engine, config, tokenizer_pool, chat=chat)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
        render_pool.start()
        yield
        engine.shutdown()
        tokenizer_pool.shutdown(wait=False, cancel_futures=True)
        render_pool.shutdown()

    app = FastAPI(title="sluice", version=__version__, lifespan=lifespan, docs_url="/docs", redoc_url=None,
                  root_path=root_path)
    install_exception_handlers(app)
    if allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["*"], allow_headers=["*"])

    @app.post("/v1/completions")
    async def create_completion(request: CompletionRequest, raw_request: Request) -> Any:
        return await completions.create_completion(request, raw_request)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Any:
        return await chat.create_chat_completion(request, raw_request)

    register_embedding_route(app, engine, config, tokenizer_pool)  # POST /v1/embeddings

    @app.get("/v1/models")
    async def list_models() -> Any:
        return JSONResponse(models.list_models().model_dump())

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> Any:
        models.model_name(model_id)  # 404 in OpenAI's shape for a model this server does not serve
        card = next(c for c in models.list_models().data if c.id == model_id)
        return JSONResponse(card.model_dump())

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest) -> Any:
        return JSONResponse((await models.tokenize(request)).model_dump())

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest) -> Any:
        return JSONResponse((await models.detokenize(request)).model_dump())

    @app.get("/health")
    async def health() -> Response:
        if state.draining:
            return OpenAIError("the server is draining", 503, code="draining").response()
        if not engine.is_healthy:
            return OpenAIError("the engine is dead", 503, code="engine_dead").response()
        return Response(status_code=200)

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping() -> Response:  # SageMaker's health route, as vLLM serves it
        return await health()

    @app.get("/version")
    async def version() -> Any:
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    guard = ServerGuard(app, api_key, max_body_bytes, is_draining=lambda: state.draining, root_path=root_path)
    return app, guard, state


class DrainingServer(uvicorn.Server):
    """uvicorn, with a drain before exit instead of its own abrupt signal handling."""

    def __init__(self, config: uvicorn.Config, state: ServerState, guard: ServerGuard,
                 shutdown_timeout: float) -> None:
        super().__init__(config)
        self.state, self.guard, self.shutdown_timeout = state, guard, shutdown_timeout
        self._drain_deadline = 0.0
        self._engine_dead_since: float | None = None
        self._forced_exit_at: float | None = None
        self.exit_code = 0

    def handle_exit(self, sig: int, frame: Any) -> None:
        # Runs in the signal handler: only flips flags; on_tick does the work. Unlike uvicorn's own
        # handler it does not re-raise the signal afterwards, so a drained server exits 0.
        if self.state.draining:
            if self._forced_exit_at is None:
                self._forced_exit_at = time.monotonic() + FORCED_EXIT_FLUSH_S  # second signal: stop waiting
            return
        self.state.draining = True
        self._drain_deadline = time.monotonic() + self.shutdown_timeout

    async def on_tick(self, counter: int) -> bool:
        if self.state.engine.errored and not self.should_exit:
            self._exit_after_engine_death()
        if self._forced_exit_at is not None and self._forced_exit_at != math.inf:
            self._force_exit()
        elif self.state.draining and not self.should_exit:
            if self.guard.num_in_flight == 0 or time.monotonic() >= self._drain_deadline:
                num_aborted = self.state.engine.abort_all("the server is shutting down")
                logger.info("drain finished; %d request(s) aborted", num_aborted)
                self.should_exit = True
        return await super().on_tick(counter)

    def _force_exit(self) -> None:
        """Second signal: every stream ends now with an error event and [DONE]; exit once they are sent (or after
        FORCED_EXIT_FLUSH_S). Not uvicorn's force_exit, which skips the lifespan shutdown (the engine core would
        be left waiting): the graceful wait for connections is only cut to the flush time."""
        if self.state.engine.num_in_flight:
            logger.info("second signal: %d request(s) aborted", self.state.engine.abort_all("the server was stopped"))
        if self.guard.num_in_flight == 0 or time.monotonic() >= self._forced_exit_at:
            self.config.timeout_graceful_shutdown = FORCED_EXIT_FLUSH_S
            self.should_exit = True
            self._forced_exit_at = math.inf  # done: on_tick stops calling this

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
    parser.add_argument("--model", dest="model_flag", default=None, help="the model, as a flag (as vllm serve "
                        "accepts it); same as the positional argument")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="0.0.0.0", help="address to bind")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--api-key", default=os.environ.get("SLUICE_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on every route except /health, /ping, /metrics, "
                             "/version, /docs and /openapi.json (default: $SLUICE_API_KEY; an empty key is an error)")
    server.add_argument("--chat-template", default=None, help="chat template (Jinja text or file) overriding the model's")
    server.add_argument("--trust-request-chat-template", action="store_true",
                        help="let requests send their own chat_template (Jinja text; refused with 400 otherwise)")
    server.add_argument("--enable-auto-tool-choice", action="store_true",
                        help='let the model decide when to call tools (tool_choice "auto", the default when a '
                             "request gives tools); needs --tool-call-parser")
    server.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS),
                        help="the model's tool-call format: hermes (Qwen 2.5/3, Hermes), llama3_json (Llama 3.1+), "
                             "mistral, pythonic (Llama 3.2/4)")
    server.add_argument("--root-path", default="", help="path prefix when behind a proxy that strips it (ASGI root_path)")
    server.add_argument("--ssl-keyfile", default=None, help="TLS private key file (serve https)")
    server.add_argument("--ssl-certfile", default=None, help="TLS certificate file (serve https)")
    server.add_argument("--allowed-origins", type=json.loads, default=None,
                        help='CORS origins as a JSON list, e.g. \'["*"]\' (default: no CORS headers)')
    server.add_argument("--generation-config", default="auto",
                        help="defaults for sampling fields a request leaves out: 'auto' reads the model folder's "
                             "generation_config.json, 'vllm' ignores it, or a folder holding one (default: auto)")
    server.add_argument("--trust-remote-code", action="store_true",
                        help="accepted for vLLM compatibility; sluice never runs code from a model folder")
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
    add_lora_args(server)
    parser.set_defaults(func=run_server)
    return parser


def run_server(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    validate_server_args(args)
    raise_open_files_limit()
    config = create_engine_config(engine_args_from(args))  # once, before the core starts
    make_lora_modules(args, config)  # a bad --lora-modules entry fails now, before the model loads
    if args.api_server_count > 1 or config.parallel.data_parallel_size > 1:
        return run_api_server_pool(args, config, run_api_server_worker)
    metrics = PrometheusStatLogger(config.model.served_model_name)
    engine = AsyncLLM.from_config(config, stat_loggers=server_stat_loggers(config, metrics),
                                  max_num_queued_reqs=args.max_num_queued_reqs, process_split=args.process_split)
    return serve(args, engine, metrics)


def raise_open_files_limit(target: int = 65536) -> None:
    """One socket per connection: a benchmark at rate inf opens a thousand, past a common default limit of 1024.
    The soft limit goes up to ``target`` (never above the hard limit, never down); API servers inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = target if hard == resource.RLIM_INFINITY else min(target, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def validate_server_args(args: argparse.Namespace) -> None:
    model_flag = getattr(args, "model_flag", None)
    if model_flag is not None:
        if args.model is not None and args.model != model_flag:
            raise ValueError(f"two models given: {args.model!r} and --model {model_flag!r}")
        args.model = model_flag
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key (or $SLUICE_API_KEY) is empty: give a key, or leave it unset to serve without one")
    if (args.ssl_keyfile is None) != (args.ssl_certfile is None):
        raise ValueError("--ssl-keyfile and --ssl-certfile go together")
    if args.allowed_origins is not None and not (isinstance(args.allowed_origins, list)
                                                 and all(isinstance(o, str) for o in args.allowed_origins)):
        raise ValueError("--allowed-origins must be a JSON list of strings")
    if args.trust_remote_code:
        logger.warning("--trust-remote-code has no effect: sluice runs only its own model code, never code "
                       "from a model folder")
    tool_call_config(args).check()
    check_device_available(args.device)
    if args.max_n < 1 or (args.max_num_queued_reqs is not None and args.max_num_queued_reqs < 0):
        raise ValueError("--max-n must be at least 1 and --max-num-queued-reqs non-negative")
    if args.api_server_count < 1:
        raise ValueError(f"--api-server-count must be at least 1, got {args.api_server_count}")
    if args.api_server_count > 1 and not args.process_split:
        raise ValueError(f"--api-server-count {args.api_server_count} needs the engine core in its own process, "
                         "which the API servers share: drop --no-process-split")
    if getattr(args, "data_parallel_size", 1) > 1 and not args.process_split:
        raise ValueError(f"--data-parallel-size {args.data_parallel_size} runs each engine core in its own "
                         "process: drop --no-process-split")
    if (args.lora_modules or args.enable_lora_runtime_updates) and not args.enable_lora:
        raise ValueError("--lora-modules and --enable-lora-runtime-updates need --enable-lora")


def tool_call_config(args: argparse.Namespace) -> ToolCallConfig:
    return ToolCallConfig(args.enable_auto_tool_choice, args.tool_call_parser)


def engine_args_from(args: argparse.Namespace) -> EngineArgs:
    engine_args = EngineArgs.from_cli_args(args)
    engine_args.model = args.model
    engine_args.usage_context = "server"  # vLLM's serving batch defaults (smaller steps than offline)
    return engine_args


def server_stat_loggers(config: EngineConfig, metrics: PrometheusStatLogger) -> list[Any]:
    return [metrics] if config.disable_log_stats else [metrics, LoggingStatLogger()]


def serving_limits(config: EngineConfig, args: argparse.Namespace, vocab: dict[str, int] | None) -> ServingLimits:
    """The server's caps, from the engine's resolved config (max_model_len capped by the KV cache), and the
    sampling defaults --generation-config names. ``vocab``: None without a tokenizer (no text prompts to cap)."""
    limits = ServingLimits(max_model_len=config.max_model_len, vocab_size=config.model.vocab_size, max_n=args.max_n,
                           max_logprobs=config.model.max_logprobs,
                           priority_scheduling=config.scheduler.policy == "priority",
                           max_prompt_chars=prompt_chars_limit(config.max_model_len, vocab) if vocab else None,
                           sampling_defaults=generation_config_defaults(args.generation_config, config.model.model))
    if limits.sampling_defaults:
        logger.info("sampling defaults from generation_config.json: %s (--generation-config vllm ignores them)",
                    limits.sampling_defaults)
    return limits


def make_lora_modules(args: argparse.Namespace, config: EngineConfig) -> LoRAModules | None:
    """The adapters named by --lora-modules; None without --enable-lora (where naming any is an error)."""
    if config.lora is None:
        return None
    modules = getattr(args, "lora_modules", None) or []
    lora_modules = LoRAModules(config.model.served_model_name, config.lora.max_lora_rank)
    for module in modules:
        try:
            lora_modules.load(module["name"], module["path"], module.get("base_model_name"))
        except OpenAIError as e:
            raise ValueError(f"--lora-modules {module['name']}: {e.message}") from e
    return lora_modules


def serve(args: argparse.Namespace, engine: AsyncLLM, metrics: PrometheusStatLogger,
          sockets: list[socket.socket] | None = None, api_server_index: int | None = None,
          server_class: type[DrainingServer] = DrainingServer) -> int:
    """Runs the HTTP server over ``engine`` until it is shut down; returns the exit code.

    ``sockets``: listening sockets made by the caller (several API servers share one port); by default uvicorn
    binds ``--host``/``--port`` itself. ``api_server_index`` marks request ids with the API server that made
    them, so that ids of several API servers never collide.
    """
    model_config = engine.model_config
    tokenizer = engine.tokenizer  # None with --skip-tokenizer-init: token-id completions only
    limits = serving_limits(engine.config, args, tokenizer.get_vocab() if tokenizer is not None else None)
    lora_modules = make_lora_modules(args, engine.config)
    config = ServingConfig([model_config.served_model_name], limits, args.enable_log_requests, args.max_log_len,
                           api_server_index=api_server_index,
                           trust_request_chat_template=args.trust_request_chat_template,
                           tool_calls=tool_call_config(args), lora_modules=lora_modules)
    chat_template = get_chat_template(tokenizer, args.chat_template) if args.chat_template else None
    app, guard, state = build_app(engine, config, metrics, args.api_key, args.max_request_body_bytes,
                                  chat_template, args.allowed_origins, args.root_path)
    install_observability(app, args, engine, metrics)  # /dashboard, traceparent, ready time
    if lora_modules is not None and runtime_updates_enabled(args):
        install_lora_routes(app, lora_modules)
    uvicorn_config = uvicorn.Config(guard, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                                    access_log=not args.disable_uvicorn_access_log, timeout_graceful_shutdown=5,
                                    lifespan="on", root_path=args.root_path, ssl_keyfile=args.ssl_keyfile,
                                    ssl_certfile=args.ssl_certfile)
    logger.info("serving %s as %r on http://%s:%d", model_config.model, model_config.served_model_name,
                args.host, args.port)
    server = server_class(uvicorn_config, state, guard, args.shutdown_timeout)
    freeze_startup_heap()  # the engine thread's steps and the event loop never wait on a full collection
    server.run(sockets=sockets)
    return server.exit_code


# ---- one API server of several (--api-server-count, api_server_pool.py) -----------------------------------------
class FrontEndServer(DrainingServer):
    """One API server of several: Ctrl-C reaches the whole process group, and only the parent acts on it (it
    forwards SIGTERM), so that each API server sees one signal, not two (a second one cuts the drain short)."""

    def handle_exit(self, sig: int, frame: Any) -> None:
        if sig != signal.SIGINT:
            super().handle_exit(sig, frame)


def run_api_server_worker(args: argparse.Namespace, config: EngineConfig, index: int, sock: socket.socket,
                          cores: list[tuple[CoreAddresses, int]]) -> None:
    """API server ``index``: the spawned process's entry point; exits with the server's exit code. ``cores``:
    the engine cores' (addresses, pid), one unless data parallel."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # see FrontEndServer
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s %(levelname)s %(name)s[api-server-{index}]: %(message)s")
    metrics = PrometheusStatLogger(config.model.served_model_name, scheduler_series=False)  # the core's own
    async_llm = AsyncLLM.from_config(config, server_stat_loggers(config, metrics), args.max_num_queued_reqs,
                                     attach=[CoreAttachment(addresses, index, pid) for addresses, pid in cores])
    exit_code = serve(args, async_llm, metrics, sockets=[sock], api_server_index=index, server_class=FrontEndServer)
    # Everything is closed by now; skip the interpreter's teardown, which takes seconds with torch loaded.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
