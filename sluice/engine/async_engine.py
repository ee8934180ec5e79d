"""AsyncLLM: the asyncio front of the engine, used by the OpenAI server.

One background thread owns the LLMEngine and is the only thread that ever touches it.
The event loop talks to it through two one-way channels:

    event loop (HTTP handlers)                      engine thread
    --------------------------                      -------------
    add_request() / abort() --> command queue -->   drain commands (add_request / abort_request)
                                                    engine.step() -> [RequestOutput]
    RequestStream.queue  <-- call_soon_threadsafe --  route the batch of outputs by request id

Only plain commands and RequestOutputs cross that boundary. The LLMEngine talks to its core through
an EngineCoreClient (engine/client.py); with ``process_split`` that client is an MPClient:
tokenization, detokenization and stop strings stay in this process, on that same thread, and only
the EngineCore (scheduler + model runner) runs in a process of its own. While idle, the thread asks
the engine every ``_HEALTH_CHECK_S`` whether its core is still alive.

A stream that is closed before its request finished (the client went away, the handler
was cancelled) aborts the request, which frees its KV blocks on the engine's next turn.
A failure that belongs to one request never reaches the loop: an exception while adding it
(tokenizing, validating, handing it to the core) fails only that request (ValueError: bad
input; anything else: RequestFailedError), and a request the core could not take finishes
with finish reason "error", which its stream raises as RequestFailedError. Any other
exception in the engine thread fails every in-flight stream with EngineDeadError and flips
``is_healthy`` to False.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from sluice.config import EngineArgs, EngineConfig, create_engine_config
from sluice.engine.client import CoreAttachment
from sluice.engine.errors import EngineDeadError, QueueFullError, RequestAbortedError
from sluice.engine.llm_engine import LLMEngine, PromptType
from sluice.lora.request import LoRARequest
from sluice.outputs import RequestOutput
from sluice.sampling_params import SamplingParams
from sluice.stats import IterationStats, SchedulerStats, StatLogger

logger = logging.getLogger(__name__)

_HEALTH_CHECK_S = 0.5  # an idle engine thread wakes this often to ask the engine whether it is alive


__all__ = ["AsyncLLM", "EngineDeadError", "LatestSchedulerStats", "QueueFullError", "RequestAbortedError",
           "RequestStream"]


class RequestFailedError(RuntimeError):
    """The engine could not run this one request (not the client's fault); the rest are unharmed."""


@dataclass(slots=True)
class _AddCommand:
    request_id: str
    prompt: PromptType
    params: SamplingParams
    priority: int
    lora_request: LoRARequest | None
    # Resolved by the engine thread: None once added, or the ValueError add_request raised.
    done: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


@dataclass(slots=True)
class _AbortCommand:
    request_ids: list[str]


_STOP = object()


class RequestStream:
    """The outputs of one request, fed by the engine thread, read by one coroutine.

    Iterating yields RequestOutputs until the finished one; leaving the iteration early
    (break, exception, cancellation) aborts the request.
    """

    def __init__(self, request_id: str, owner: "AsyncLLM") -> None:
        self.request_id = request_id
        self.finished = False
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._owner = owner

    def put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)

    def close(self) -> None:
        """Aborts the request unless it already finished (idempotent)."""
        if not self.finished:
            self.finished = True
            self._owner._abort_nowait(self.request_id)

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                item = await self._queue.get()
                if isinstance(item, BaseException):
                    self.finished = True
                    raise item
                if item.finished:
                    self.finished = True
                    if item.failed:
                        raise RequestFailedError(f"the engine failed request {self.request_id}")
                yield item
        finally:
            self.close()


class LatestSchedulerStats(StatLogger):
    """Keeps the last SchedulerStats so admission control can see the waiting queue."""

    def __init__(self) -> None:
        self.stats = SchedulerStats()

    def record(self, scheduler_stats: SchedulerStats, iteration_stats: IterationStats) -> None:
        self.stats = scheduler_stats


class AsyncLLM:
    """Asyncio front of LLMEngine: per-request streams, aborts, health, shutdown."""

    def __init__(self, engine: LLMEngine, max_num_queued_reqs: int | None = None,
                 latest_stats: LatestSchedulerStats | None = None) -> None:
        """``engine``: an LLMEngine whose stat loggers include ``latest_stats`` (admission control reads it);
        ``from_config`` wires both."""
        self.engine = engine
        self.max_num_queued_reqs = max_num_queued_reqs
        self._latest_stats = latest_stats or LatestSchedulerStats()
        self._streams: dict[str, RequestStream] = {}  # touched only on the event loop
        self._commands: queue.Queue[Any] = queue.Queue()
        self._dead_lock = threading.Lock()  # orders "enqueue a command" against "engine died"
        self._dead_error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs, stat_loggers: list[StatLogger] | None = None,
                         max_num_queued_reqs: int | None = None, process_split: bool = False) -> "AsyncLLM":
        """``process_split``: run the EngineCore in its own process (engine/core_proc.py)."""
        return cls.from_config(create_engine_config(engine_args), stat_loggers, max_num_queued_reqs, process_split)

    @classmethod
    def from_config(cls, config: EngineConfig, stat_loggers: list[StatLogger] | None = None,
                    max_num_queued_reqs: int | None = None, process_split: bool = False,
                    attach: CoreAttachment | list[CoreAttachment] | None = None) -> "AsyncLLM":
        """An AsyncLLM over the engine core client for ``config`` (make_engine_core_client: in process, a core
        process of its own with ``process_split``, or the shared core of ``attach``)."""
        latest = LatestSchedulerStats()
        engine = LLMEngine.from_config(config, [latest, *(stat_loggers or [])], process_split, attach)
        return cls(engine, max_num_queued_reqs=max_num_queued_reqs, latest_stats=latest)

    # ---- read-only views (safe from any thread: set once at construction) ----------------
    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def config(self) -> EngineConfig:
        """The resolved config, with the KV cache the core sized: what requests are validated against."""
        return self.engine.config

    @property
    def model_config(self) -> Any:
        return self.engine.model_config

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            chat_template: str | None = None, **kwargs: Any) -> list[int]:
        """Renders and tokenizes a chat. Tokenizer-only (no engine state), so any thread may call it;
        an engine in another process would keep a tokenizer here in the front."""
        return self.engine.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                               chat_template=chat_template, **kwargs)

    @property
    def errored(self) -> bool:
        return self._dead_error is not None

    @property
    def is_healthy(self) -> bool:
        return self._dead_error is None and self._thread is not None and self._thread.is_alive()

    @property
    def num_in_flight(self) -> int:
        """Requests added through this front and not yet finished or aborted."""
        return len(self._streams)

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Starts the engine thread, bound to the running event loop (idempotent)."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._engine_loop, name="sluice-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stops the engine thread (and an engine-core process); in-flight streams end with EngineDeadError."""
        if self._thread is not None:
            self._commands.put(_STOP)
            self._thread.join(timeout)
            self._thread = None
        self.engine.shutdown()

    # ---- requests ------------------------------------------------------------------------
    async def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                          priority: int = 0) -> RequestStream:
        """Adds a request and returns its stream once the engine accepted it.

        Raises ValueError (bad input, from the engine), QueueFullError, RequestFailedError or EngineDeadError.
        """
        return (await self.add_requests([(request_id, prompt, params)], priority))[0]

    async def add_requests(self, requests: list[tuple[str, Any, SamplingParams]],
                           priority: int = 0, lora_request: LoRARequest | None = None) -> list[RequestStream]:
        """Adds several requests in one engine turn (a request's prompts all start in the same step);
        all or none: if one fails, those already added are aborted and its error is raised."""
        self.start()
        ids = [request_id for request_id, _, _ in requests]
        if len(set(ids)) != len(ids) or any(request_id in self._streams for request_id in ids):
            raise ValueError("request ids must be unique and not already in flight")
        self._check_admission(len(requests))
        streams = [RequestStream(request_id, self) for request_id in ids]
        commands = [_AddCommand(request_id, prompt, params, priority, lora_request)
                    for request_id, prompt, params in requests]
        for stream in streams:
            self._streams[stream.request_id] = stream
        tracer = self.engine.tracer  # sluice/tracing.py; None unless tracing is on
        if tracer is not None:
            for request_id in ids:
                tracer.capture_parent(request_id)  # here, in the caller's context (its traceparent)
        try:
            self._send(*commands)
            await asyncio.gather(*(asyncio.wrap_future(c.done) for c in commands))
        except BaseException:
            for stream, command in zip(streams, commands):
                if command.done.done() and not command.done.cancelled() and command.done.exception() is not None:
                    stream.finished = True  # never added: nothing to abort
                    self._streams.pop(stream.request_id, None)
                    if tracer is not None:
                        tracer.forget(stream.request_id)
                else:
                    stream.close()  # added, or may be added after all
            raise
        return streams

    async def generate(self, prompt: PromptType, params: SamplingParams, request_id: str,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Yields the request's outputs; closing the iterator early aborts the request."""
        stream = await self.add_request(request_id, prompt, params, priority)
        async for output in stream:
            yield output

    async def abort(self, request_id: str) -> None:
        self._abort_nowait(request_id)

    def _abort_nowait(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None and not self.errored:
            self._send(_AbortCommand([request_id]))

    def abort_all(self, reason: str) -> int:
        """Aborts every in-flight request, ending each stream with RequestAbortedError(reason)."""
        streams = list(self._streams.values())
        for stream in streams:
            stream.put(RequestAbortedError(reason))
            self._abort_nowait(stream.request_id)
        return len(streams)

    def _check_admission(self, num_new: int = 1) -> None:
        if self.errored:
            raise EngineDeadError(f"the engine is dead: {self._dead_error!r}")
        if self.max_num_queued_reqs is None:
            return
        # Only requests that will really wait count. Of those this front knows and the scheduler is not running
        # (the new ones included), the free sequence slots take the first ones at the next step, unless the
        # scheduler already had to leave requests waiting (then the KV cache is what is short, and all wait).
        stats = self._latest_stats.stats
        not_running = len(self._streams) - stats.num_running_reqs + num_new
        max_num_seqs = self.engine.config.scheduler.max_num_seqs
        free_slots = 0 if stats.num_waiting_reqs else max(0, max_num_seqs - stats.num_running_reqs)
        num_waiting = not_running - free_slots
        if num_waiting > self.max_num_queued_reqs:
            raise QueueFullError(f"the server is at capacity: {max(0, num_waiting - num_new)} requests are "
                                 f"already waiting (--max-num-queued-reqs {self.max_num_queued_reqs}); "
                                 "retry later")

    def _send(self, *commands: Any) -> None:
        with self._dead_lock:
            if self._dead_error is not None:
                raise EngineDeadError(f"the engine is dead: {self._dead_error!r}")
            for command in commands:
                self._commands.put(command)

    # ---- the event-loop side of output routing -------------------------------------------
    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue  # aborted meanwhile
            stream.put(output)
            if output.finished:
                del self._streams[output.request_id]

    def _fail_all(self, error: BaseException) -> None:
        for stream in self._streams.values():
            stream.put(error)
        self._streams.clear()

    # ---- the engine thread -----------------------------------------------------------------
    def _engine_loop(self) -> None:
        stats_dirty = False  # an abort freed blocks: step once more so stat loggers see it
        try:
            while True:
                busy = stats_dirty or self.engine.has_unfinished_requests()
                commands = self._drain_commands(block=not busy)
                if any(c is _STOP for c in commands):
                    break
                for command in commands:
                    stats_dirty |= self._apply(command)
                if not (self.engine.has_unfinished_requests() or stats_dirty):
                    continue
                stats_dirty = False
                outputs = self.engine.step()
                if outputs:
                    self._loop.call_soon_threadsafe(self._dispatch, outputs)
        except BaseException as e:  # noqa: BLE001 - every failure must reach the clients
            logger.exception("engine loop died")
            self._die(e)
            return
        self._die(EngineDeadError("the engine was shut down"))

    def _drain_commands(self, block: bool) -> list[Any]:
        commands = [self._wait_for_command()] if block else []
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _wait_for_command(self) -> Any:
        # An engine whose core lives in another process can die while this thread waits for commands.
        while True:
            try:
                return self._commands.get(timeout=_HEALTH_CHECK_S)
            except queue.Empty:
                self.engine.check_health()  # raises if the engine died: the loop's handler takes over

    def _apply(self, command: Any) -> bool:
        """Runs one command on the engine; returns True if it freed KV blocks."""
        if isinstance(command, _AbortCommand):
            self.engine.abort_request(command.request_ids)
            return True
        if not command.done.set_running_or_notify_cancel():
            return False  # the caller gave up before the engine saw it
        try:
            self.engine.add_request(command.request_id, command.prompt, command.params,
                                    priority=command.priority, lora_request=command.lora_request)
        except ValueError as e:
            command.done.set_exception(e)
        except Exception as e:  # noqa: BLE001 - one request's failure must not stop the engine
            logger.exception("request %s failed while being added", command.request_id)
            failed = RequestFailedError(f"the engine could not add request {command.request_id}")
            failed.__cause__ = e
            command.done.set_exception(failed)
        else:
            command.done.set_result(None)
        return False

    def _die(self, error: BaseException) -> None:
        dead = error if isinstance(error, EngineDeadError) else EngineDeadError(f"engine error: {error!r}")
        with self._dead_lock:
            self._dead_error = dead
            pending = self._drain_commands(block=False)
        for command in pending:
            if isinstance(command, _AddCommand):
                command.done.set_exception(dead)
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._fail_all, dead)
