"""OpenAIServing: what the completions and chat handlers share.

The model-name check, tokenization off the event loop, adding one engine request per
prompt (engine errors become OpenAI errors, and a failure part-way aborts the ones
already added), merging per-prompt streams, SSE framing, logprob formatting, request
logging, and cancelling a non-streaming request when its client disconnects.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Request
from pydantic import BaseModel

from sluice.engine.async_engine import (AsyncLLM, EngineDeadError, QueueFullError, RequestAbortedError,
                                        RequestFailedError, RequestStream)
from sluice.entrypoints.openai.errors import OpenAIError, bad_request, internal_error
from sluice.entrypoints.openai.protocol import (ChatChoiceLogprobs, ChatLogprobToken, ChatTopLogprob,
                                                CompletionLogprobs, SamplingFields, UsageInfo)
from sluice.entrypoints.openai.sampling import ServingLimits, check_prompt_chars
from sluice.entrypoints.openai.tool_calling import ToolCallConfig
from sluice.lora.request import LoRARequest
from sluice.outputs import Logprob, RequestOutput
from sluice.sampling_params import SamplingParams

if TYPE_CHECKING:
    from sluice.entrypoints.openai.serving_lora import LoRAModules

logger = logging.getLogger("sluice.requests")
T = TypeVar("T")


@dataclass(frozen=True)
class ServingConfig:
    served_model_names: list[str]
    limits: ServingLimits
    enable_log_requests: bool = False
    max_log_len: int | None = None
    api_server_index: int | None = None  # set when several API server processes share one engine core
    trust_request_chat_template: bool = False  # --trust-request-chat-template: requests may send a template
    tool_calls: ToolCallConfig = ToolCallConfig()  # --enable-auto-tool-choice, --tool-call-parser
    lora_modules: "LoRAModules | None" = None  # with --enable-lora: adapters a request's model field may name


@dataclass(slots=True)
class EnginePrompt:
    """One prompt as the engine gets it: its text (when known) and its token ids."""

    text: str | None
    token_ids: list[int]

    def as_engine_input(self) -> dict[str, Any]:
        return {"prompt": self.text, "prompt_token_ids": self.token_ids}


@dataclass(slots=True)
class ChoiceState:
    """Per-choice bookkeeping while a stream is sent."""

    num_tokens: int = 0
    num_chars: int = 0  # text sent so far, for completions' text_offset
    started: bool = False
    finished: bool = False


RETRY_AFTER_S = "1"  # a full queue drains in about a request's time: clients may come back soon


def engine_error_to_openai(error: BaseException) -> OpenAIError:
    if isinstance(error, OpenAIError):
        return error
    if isinstance(error, ValueError):
        return OpenAIError(str(error), 400)
    if isinstance(error, QueueFullError):
        return OpenAIError(str(error), 503, code="queue_full", headers={"Retry-After": RETRY_AFTER_S})
    if isinstance(error, RequestAbortedError):
        return OpenAIError(f"request aborted: {error}", 503, code="aborted")
    if isinstance(error, EngineDeadError):
        return OpenAIError("the engine is dead; the server is restarting or shutting down", 503, code="engine_dead")
    if isinstance(error, RequestFailedError):
        return internal_error(error.__cause__ or error, str(error))
    return internal_error(error)


# JSON leaves these raw, but line readers built on str.splitlines (httpx's iter_lines, requests' with
# decode_unicode) end a line at each, cutting an event's JSON in two; escaped, they read the same once parsed.
_SSE_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(payload: BaseModel | dict) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    if not data.isascii():
        data = data.translate(_SSE_LINE_BREAKS)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def usage_chunk(request: SamplingFields, chunk: BaseModel, usage: Callable[[], UsageInfo]) -> str | None:
    """The final usage-only chunk of a stream, when the client asked for it (stream_options.include_usage)."""
    if request.stream_options is None or not request.stream_options.include_usage:
        return None
    return sse(chunk.model_copy(update={"choices": [], "usage": usage()}))


def continuous_usage(request: SamplingFields, usage: Callable[[], UsageInfo]) -> UsageInfo | None:
    """The usage so far, for every chunk of a stream with stream_options.continuous_usage_stats (vLLM's
    extension, which GuideLLM always sends); None otherwise."""
    options = request.stream_options
    return usage() if options is not None and options.continuous_usage_stats else None


def random_id(prefix: str, api_server_index: int | None = None) -> str:
    """``prefix-<uuid4>``; with several API servers ``prefix-<index>-<uuid4>``, so that the ids they send to
    their shared engine core differ by construction (and a response names the API server that made it)."""
    if api_server_index is None:
        return f"{prefix}-{uuid.uuid4().hex}"
    return f"{prefix}-{api_server_index}-{uuid.uuid4().hex}"


class OpenAIServing:
    def __init__(self, engine: AsyncLLM, config: ServingConfig, tokenizer_pool: ThreadPoolExecutor,
                 default_chat_template: str | None = None) -> None:
        self.engine = engine
        self.default_chat_template = default_chat_template
        self.config = config
        self.limits = config.limits
        self._tokenizer_pool = tokenizer_pool

    # ---- checks ----------------------------------------------------------------------------
    def model_name(self, requested: str | None) -> str:
        """The name to report; 404 if the client asked for a model this server does not serve."""
        if requested is None or requested in self.config.served_model_names:
            return requested or self.config.served_model_names[0]
        if self.lora_request(requested) is not None:
            return requested
        served = self.config.served_model_names + list(self.config.lora_modules.adapters if self.config.lora_modules
                                                      else ())
        raise OpenAIError(f"The model {requested!r} does not exist; this server serves "
                          f"{', '.join(map(repr, served))}", 404, param="model", code="model_not_found")

    def lora_request(self, model: str | None) -> LoRARequest | None:
        """The adapter a request's model field names (None: the base model)."""
        modules = self.config.lora_modules
        return modules.get(model) if modules is not None else None

    # ---- tokenizer work, off the event loop ----------------------------------------------------
    async def run_in_tokenizer_pool(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizer_pool, lambda: fn(*args, **kwargs))

    def require_tokenizer(self, what: str, param: str) -> Any:
        """The tokenizer; a 400 naming ``param`` when the server runs with --skip-tokenizer-init."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise bad_request(f"{what} needs a tokenizer, but this server runs with --skip-tokenizer-init: send "
                              "prompts to /v1/completions as token ids", param)
        return tokenizer

    async def encode(self, text: str, add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
        """Token ids of ``text``, in the pool; a text too long for max_model_len is a 400 before any work."""
        tokenizer = self.require_tokenizer("a text prompt", param)
        check_prompt_chars(text, self.limits, param)
        return await self.run_in_tokenizer_pool(tokenizer.encode, text, add_special_tokens=add_special_tokens)

    async def decode(self, token_ids: list[int], what: str, param: str) -> str:
        """The text of ``token_ids``, in the pool; a 400 without a tokenizer."""
        tokenizer = self.require_tokenizer(what, param)
        return await self.run_in_tokenizer_pool(tokenizer.decode, token_ids)

    def decode_token(self, token_id: int, logprob: Logprob | None = None) -> str:
        """A logprob entry's token as text; ``token_id:<id>`` without a tokenizer (vLLM's form)."""
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        if self.engine.tokenizer is None:
            return f"token_id:{token_id}"
        return self.engine.tokenizer.decode([token_id])

    # ---- engine requests -----------------------------------------------------------------------
    async def add_prompts(self, request_id: str, prompts: Sequence[EnginePrompt],
                          params: Sequence[SamplingParams], priority: int,
                          lora_request: LoRARequest | None = None) -> list[RequestStream]:
        """One engine request per prompt, all added in the same engine turn; all or none."""
        requests = []
        for i, (prompt, prompt_params) in enumerate(zip(prompts, params)):
            sub_id = request_id if len(prompts) == 1 else f"{request_id}-{i}"
            self.log_request(sub_id, prompt, prompt_params)
            requests.append((sub_id, prompt.as_engine_input(), prompt_params))
        try:
            return await self.engine.add_requests(requests, priority=priority, lora_request=lora_request)
        except Exception as e:
            raise engine_error_to_openai(e) from e

    def log_request(self, request_id: str, prompt: EnginePrompt, params: SamplingParams) -> None:
        if not self.config.enable_log_requests:
            return
        limit = self.config.max_log_len
        text = prompt.text if prompt.text is None or limit is None else prompt.text[:limit]
        token_ids = prompt.token_ids if limit is None else prompt.token_ids[:limit]
        logger.info("Received request %s: prompt: %r, params: %s, prompt_token_ids: %s",
                    request_id, text, params, token_ids)

    # ---- logprobs in OpenAI's shapes ---------------------------------------------------------------
    @staticmethod
    def _top(entries: dict[int, Logprob], num: int) -> list[tuple[int, Logprob]]:
        ranked = sorted(entries.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else math.inf)
        return ranked[:num]

    def completion_logprobs(self, token_ids: Sequence[int], logprobs: Sequence[dict[int, Logprob] | None],
                            num_top: int, text_offset: int) -> CompletionLogprobs:
        """Completions' parallel lists; a None entry (the first prompt token) has no logprob."""
        out = CompletionLogprobs()
        for token_id, entries in zip(token_ids, logprobs):
            sampled = entries.get(token_id) if entries else None
            token = self.decode_token(token_id, sampled)
            out.tokens.append(token)
            out.text_offset.append(text_offset)
            text_offset += len(token)
            if entries is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(_finite(sampled.logprob) if sampled else None)
            out.top_logprobs.append({self.decode_token(t, lp): _finite(lp.logprob)
                                     for t, lp in self._top(entries, num_top)})
        return out

    def chat_logprobs(self, token_ids: Sequence[int], logprobs: Sequence[dict[int, Logprob]],
                      num_top: int) -> ChatChoiceLogprobs:
        content = []
        for token_id, entries in zip(token_ids, logprobs):
            sampled = entries.get(token_id)
            token = self.decode_token(token_id, sampled)
            top = [ChatTopLogprob(token=(t := self.decode_token(tid, lp)), logprob=_finite(lp.logprob),
                                  bytes=list(t.encode("utf-8")))
                   for tid, lp in self._top(entries, num_top)]
            content.append(ChatLogprobToken(token=token, logprob=_finite(sampled.logprob) if sampled else -9999.0,
                                            bytes=list(token.encode("utf-8")), top_logprobs=top))
        return ChatChoiceLogprobs(content=content)


def _finite(value: float) -> float:
    # JSON has no -inf; OpenAI reports -9999.0 for impossible tokens.
    return value if math.isfinite(value) else -9999.0


async def merge_streams(streams: Sequence[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Yields (prompt index, output) from all streams as they come; closing aborts the rest."""
    if len(streams) == 1:
        try:
            async for output in streams[0]:
                yield 0, output
        finally:
            streams[0].close()
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for output in stream:
                queue.put_nowait((index, output))
            queue.put_nowait((index, None))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((index, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(streams)
    try:
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.close()


async def cancel_on_disconnect(raw_request: Request, work: Awaitable[T]) -> T:
    """Runs ``work`` unless the client disconnects first, in which case it is cancelled
    (its streams close, which aborts the engine requests and frees their KV blocks)."""
    task = asyncio.ensure_future(work)

    async def wait_for_disconnect() -> None:
        while (await raw_request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(wait_for_disconnect())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled():
        raise OpenAIError("client disconnected", 499)
    try:
        return task.result()
    except Exception as e:  # noqa: BLE001 - engine failures become OpenAI errors
        raise engine_error_to_openai(e) from e
