"""sluice on Ray Serve: an OpenAI-compatible ingress in front of autoscaled sluice engine replicas.

    serve run sluice.ray_serve:build_app model=path/to/model min_replicas=1 max_replicas=4

    HTTP --> OpenAIIngress (FastAPI via serve.ingress)  --DeploymentHandle, streamed-->  SluiceEngine replica 1
             parses the body, picks nothing itself            Ray Serve's request router   SluiceEngine replica 2 ...
             retries a request whose replica failed           (PrefixCacheAffinityRouter:  AsyncLLM + sluice's own
             before its first byte                             prompts with a shared        OpenAI handlers
                                                              prefix go to one replica)

Each SluiceEngine replica is a whole sluice server without HTTP: an AsyncLLM (engine core on a thread of the
replica) and the completion and chat handlers of sluice/entrypoints/openai, so requests are validated, sampled,
streamed and answered exactly as `sluice serve` answers them. A replica streams a response as its head (status,
media type, headers) and then the body's chunks; the ingress sends them on as they come. Routing between replicas
is Ray Serve's: its prefix-cache affinity router matches each request's prompt text (the first argument's
``prompt``) against what every replica was sent, falling back to power-of-two-choices when the replicas' queues
differ by more than ``imbalanced_threshold``. Ray Serve scales the replicas between ``min_replicas`` and
``max_replicas`` on ongoing requests per replica (``target_ongoing_requests``) and restarts one whose
``check_health`` raises (a dead engine).

A replica that dies (its actor killed, its node gone) fails the requests it held. The ingress retries a request
on another replica when it failed before its first body byte (nothing was sent to the client yet); a stream that
already started ends with an error event, as a dead engine's streams do under `sluice serve`.
"""
# No `from __future__ import annotations`: FastAPI reads the ingress methods' annotations through Serve's
# wrapper, which cannot resolve string annotations.
import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.config import AutoscalingConfig, RequestRouterConfig
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from pydantic import ValidationError
from starlette.requests import Request as StarletteRequest

from sluice.config import EngineArgs, create_engine_config
from sluice.engine.async_engine import AsyncLLM
from sluice.entrypoints.openai.errors import OpenAIError, install_exception_handlers, validation_error_to_openai
from sluice.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from sluice.entrypoints.openai.render_pool import ChatRenderPool
from sluice.entrypoints.openai.sampling import ServingLimits
from sluice.entrypoints.openai.serving_chat import OpenAIServingChat
from sluice.entrypoints.openai.serving_completion import OpenAIServingCompletion
from sluice.entrypoints.openai.serving_engine import ServingConfig
from sluice.entrypoints.openai.serving_models import OpenAIServingModels
from sluice.metrics import METRICS_CONTENT_TYPE, PrometheusStatLogger

logger = logging.getLogger("ray.serve")

# Ray Serve's prefix-cache affinity router (ray.serve.llm.request_router.PrefixCacheAffinityRouter re-exports it,
# but that module pulls in ray[llm]'s dependencies; the class itself needs only Serve).
PREFIX_ROUTER = "ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router.PrefixCacheAffinityRouter"
MAX_ATTEMPTS = 5  # tries of a request whose replica failed before its first byte
_RETRYABLE = (RayActorError, ActorDiedError, ActorUnavailableError, BackPressureError, DeploymentUnavailableError)
_SERVER_KEYS = {"min_replicas": 1, "max_replicas": 2, "initial_replicas": None, "target_ongoing_requests": 8,
                "max_ongoing_requests": 64, "imbalanced_threshold": 8, "num_cpus": 1, "num_gpus": None,
                "health_check_period_s": 5, "health_check_timeout_s": 30, "max_n": 128,
                "generation_config": "auto", "name": "sluice"}


@dataclass(frozen=True, slots=True)
class RoutedRequest:
    """What the ingress hands a replica: ``prompt`` is the text the prefix router matches (its documented
    contract: the first argument's ``prompt`` or ``messages``), ``body`` the request as the client sent it."""
    prompt: str
    route: str  # "completions" | "chat"
    body: dict[str, Any]


def routing_text(route: str, body: dict[str, Any]) -> str:
    """The prompt text requests share prefixes on: a completion's prompt, a chat's message contents in order."""
    if route == "chat":
        parts = []
        for message in body.get("messages") or []:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):
                content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
            parts.append(f"{message.get('role', '')}:{content or ''}\n" if isinstance(message, dict) else "")
        return "".join(parts)
    prompt = body.get("prompt")
    return prompt if isinstance(prompt, str) else json.dumps(prompt)[:4096]


# ---- the engine replica ------------------------------------------------------------------------------------------
class SluiceEngine:
    """One replica: an AsyncLLM and sluice's OpenAI handlers; answers RoutedRequests as a streamed response."""

    def __init__(self, engine_args: dict[str, Any], server_args: dict[str, Any]) -> None:
        args = EngineArgs(**engine_args)
        args.usage_context = "server"
        config = create_engine_config(args)
        self.metrics = PrometheusStatLogger(config.model.served_model_name)
        self.engine = AsyncLLM.from_config(config, stat_loggers=[self.metrics])
        from sluice.entrypoints.openai.api_server import serving_limits

        tokenizer = self.engine.tokenizer
        limits: ServingLimits = serving_limits(self.engine.config, SimpleNamespace(**server_args),
                                               tokenizer.get_vocab() if tokenizer is not None else None)
        serving = ServingConfig([config.model.served_model_name], limits)
        self._tokenizer_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sluice-tokenizer")
        self._render_pool = ChatRenderPool(num_workers=1)
        self.completions = OpenAIServingCompletion(self.engine, serving, self._tokenizer_pool)
        self.chat = OpenAIServingChat(self.engine, serving, self._tokenizer_pool, render_pool=self._render_pool)
        self.models = OpenAIServingModels(self.engine, serving, self._tokenizer_pool, chat=self.chat)
        self._started = False

    def _start(self) -> None:
        if not self._started:  # on the replica's event loop: AsyncLLM binds its engine thread to it
            self.engine.start()
            self._render_pool.start()
            self._started = True

    async def generate(self, request: RoutedRequest) -> AsyncIterator[dict[str, Any] | bytes]:
        """The response's head ({"status", "media_type", "headers"}), then its body in chunks."""
        self._start()
        gone = asyncio.Event()  # set when the ingress stops reading: the handlers abort the request
        raw_request = _request_watching(gone)
        try:
            if request.route == "chat":
                response = await self.chat.create_chat_completion(ChatCompletionRequest(**request.body),
                                                                  raw_request)
            else:
                response = await self.completions.create_completion(CompletionRequest(**request.body), raw_request)
        except OpenAIError as e:
            response = e.response()
        except ValidationError as e:  # a body the protocol refuses: the 400 `sluice serve` gives
            response = validation_error_to_openai(RequestValidationError(e.errors())).response()
        yield {"status": response.status_code, "media_type": response.media_type,
               "headers": {k: v for k, v in response.headers.items() if k.lower() != "content-length"}}
        if isinstance(response, StreamingResponse):
            try:
                async for chunk in response.body_iterator:
                    yield chunk.encode() if isinstance(chunk, str) else bytes(chunk)
            finally:
                gone.set()
        else:
            yield bytes(response.body)

    def list_models(self) -> dict[str, Any]:
        return self.models.list_models().model_dump()

    def render_metrics(self) -> bytes:
        return self.metrics.render()

    def check_health(self) -> None:
        """Ray Serve's health probe: a replica whose engine died is restarted."""
        if self.engine.errored:
            raise RuntimeError("the sluice engine is dead")

    def __del__(self) -> None:
        try:
            self.engine.shutdown()
            self._render_pool.shutdown()
            self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)
        except Exception:  # noqa: BLE001 - best effort at teardown
            pass


def _request_watching(gone: asyncio.Event) -> StarletteRequest:
    """A stand-in for the HTTP request the handlers watch for a disconnect: it 'disconnects' when ``gone`` is set."""
    async def receive() -> dict[str, Any]:
        await gone.wait()
        return {"type": "http.disconnect"}

    return StarletteRequest({"type": "http", "method": "POST", "path": "/", "headers": [], "query_string": b""},
                            receive)


# Defined before the ingress class: Serve pickles that class by value with the globals it sees.
async def _chain(first: bytes, stream: Any) -> AsyncIterator[bytes]:
    try:
        yield first
        async for chunk in stream:
            yield chunk
    except _RETRYABLE:  # the replica died mid-stream: the client gets an error event instead of a cut
        logger.warning("an engine replica died while streaming")
        yield b'data: {"error": {"message": "the engine replica died", "type": "InternalServerError", ' \
              b'"code": 500}}\n\ndata: [DONE]\n\n'
    finally:
        stream.cancel()


# ---- the ingress -------------------------------------------------------------------------------------------------
ingress_app = FastAPI(title="sluice on Ray Serve")
install_exception_handlers(ingress_app)


@serve.ingress(ingress_app)
class OpenAIIngress:
    """The OpenAI routes; every generation goes to an engine replica through Ray Serve's router."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine  # DeploymentHandle of SluiceEngine

    @ingress_app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._forward("completions", request)

    @ingress_app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._forward("chat", request)

    @ingress_app.get("/v1/models")
    async def models(self) -> Response:
        return JSONResponse(await self.engine.list_models.remote())

    @ingress_app.get("/health")
    async def health(self) -> Response:
        return Response(status_code=200)

    @ingress_app.get("/metrics")
    async def metrics(self) -> Response:
        """One replica's series (Ray Serve picks it); Ray's own metrics export covers the whole deployment."""
        return Response(await self.engine.render_metrics.remote(), media_type=METRICS_CONTENT_TYPE)

    async def _forward(self, route: str, request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return OpenAIError("the body is not JSON", 400).response()
        if not isinstance(body, dict):
            return OpenAIError("the body must be a JSON object", 400).response()
        routed = RoutedRequest(routing_text(route, body), route, body)
        head, first, stream = await self._first_byte(routed)
        return StreamingResponse(_chain(first, stream), status_code=head["status"], media_type=head["media_type"],
                                 headers=head["headers"])

    async def _first_byte(self, routed: RoutedRequest) -> tuple[dict[str, Any], bytes, Any]:
        """The response's head and first body chunk, retried on another replica while none had come."""
        for attempt in range(1, MAX_ATTEMPTS + 1):
            stream = self.engine.options(stream=True).generate.remote(routed)
            try:
                head = await stream.__anext__()
                first = await stream.__anext__()
                return head, first, stream
            except _RETRYABLE as e:
                stream.cancel()
                if attempt == MAX_ATTEMPTS:
                    raise OpenAIError("no engine replica could take the request", 503, code="unavailable") from e
                logger.warning("replica failed before the first byte (%s); retrying (%d/%d)", type(e).__name__,
                               attempt, MAX_ATTEMPTS)
                await asyncio.sleep(0.1 * attempt)  # time for Serve to drop the dead replica
        raise AssertionError("unreachable")


# ---- the application ---------------------------------------------------------------------------------------------
def build_app(args: dict[str, Any]) -> Any:
    """The Serve application: ``args`` are EngineArgs fields (``model``, ``max_model_len``, ...) and the serving
    keys of ``_SERVER_KEYS`` (replicas, autoscaling, routing, health checks). ``serve run
    sluice.ray_serve:build_app model=...`` passes them as strings; numbers are parsed here."""
    server = {key: _parse(args.get(key, default)) for key, default in _SERVER_KEYS.items()}
    engine_fields = set(EngineArgs.__dataclass_fields__)
    unknown = set(args) - engine_fields - set(_SERVER_KEYS)
    if unknown:
        raise ValueError(f"unknown arguments: {', '.join(sorted(unknown))}")
    engine_args = {key: _parse(value) for key, value in args.items() if key in engine_fields}
    server_args = {"max_n": server["max_n"], "generation_config": server["generation_config"]}
    autoscaling = AutoscalingConfig(min_replicas=server["min_replicas"], max_replicas=server["max_replicas"],
                                    initial_replicas=server["initial_replicas"],
                                    target_ongoing_requests=server["target_ongoing_requests"])
    router = RequestRouterConfig(request_router_class=PREFIX_ROUTER,
                                 request_router_kwargs={"imbalanced_threshold": server["imbalanced_threshold"]})
    actor_options = {"num_cpus": server["num_cpus"]}
    if server["num_gpus"]:
        actor_options["num_gpus"] = server["num_gpus"]
    engine = serve.deployment(SluiceEngine, name=f"{server['name']}-engine", autoscaling_config=autoscaling,
                              request_router_config=router, max_ongoing_requests=server["max_ongoing_requests"],
                              health_check_period_s=server["health_check_period_s"],
                              health_check_timeout_s=server["health_check_timeout_s"],
                              ray_actor_options=actor_options)
    ingress = serve.deployment(OpenAIIngress, name=f"{server['name']}-ingress", num_replicas=1,
                               ray_actor_options={"num_cpus": 0})
    return ingress.bind(engine.bind(engine_args, server_args))


def _parse(value: Any) -> Any:
    """A command-line value ("4", "0.5", "true") as the number or flag it names; other values as given."""
    if not isinstance(value, str):
        return value
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value
