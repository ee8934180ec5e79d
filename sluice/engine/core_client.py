"""MPClient: the EngineCoreClient (engine/client.py) of an engine core in its own process, over ZMQ.

    LLMEngine (this process)                              engine-core process (core_proc.py)
      tokenize, validate, n > 1 fan-out                     Scheduler + ModelRunner
      OutputProcessor: detokenize, stop strings             busy loop: drain commands, step, send
      engine_core = MPClient -- ipc PUSH: add/finish ------>
                           <--- ipc PULL: CoreStep --------

MPClient answers the same calls as InprocClient, so LLMEngine runs unchanged over either. ``step()`` returns the outputs of every core step that arrived since the last call, waiting for
at least one while requests are in flight, and with none in flight until the core has applied every command
sent (so the stats after an abort show its freed KV blocks).

Two ways to get one (``make_engine_core_client`` picks): ``MPClient.spawn(config)`` starts a core of its own (one
API server, the default), and ``MPClient.attach(config, addresses, index, core_pid)`` joins a core that another process started for several API
servers (``--api-server-count``). Either way the core process is watched through a file descriptor that turns
readable when it exits (the multiprocessing sentinel of a child, a pidfd otherwise), polled next to the output
socket, so a dead core raises EngineCoreDeadError at once instead of hanging; ``check_health()`` lets an idle
caller ask.
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import pickle
import select
import time
from collections.abc import Iterable
from multiprocessing.process import BaseProcess

import msgspec
import zmq

from sluice.config import EngineConfig
from sluice.core.interface import EngineCoreOutput
from sluice.core.request import Request
from sluice.engine.core_proc import (AddRequest, CoreAddresses, CoreFailed, CoreInput, CoreOutput, CoreReady,
                                     CoreStep, FinishRequests, Shutdown, run_engine_core)
from sluice.engine.errors import EngineCoreDeadError
from sluice.stats import SchedulerStats

logger = logging.getLogger(__name__)

DEFAULT_STARTUP_TIMEOUT_S = 600.0


def spawn_engine_core(config: EngineConfig, addresses: CoreAddresses, export_metrics: bool = False,
                      engine_index: int | None = None, env: dict[str, str] | None = None) -> BaseProcess:
    """Starts the core process for ``addresses``' clients; it exits if this process goes away.
    ``export_metrics``: it writes the scheduler's Prometheus series itself (see sluice/metrics.py), labelled
    ``engine=engine_index`` when one of several data-parallel cores. ``env``: set in the core's environment
    (its devices and CPU threads under data parallelism)."""
    name = "sluice-engine-core" if engine_index is None else f"sluice-engine-core-{engine_index}"
    process = multiprocessing.get_context("spawn").Process(
        target=run_engine_core, args=(config, addresses, os.getpid(), export_metrics, engine_index), name=name,
        daemon=True)
    saved = {key: os.environ.get(key) for key in env or {}}
    os.environ.update(env or {})  # a spawned child copies this process's environment at start()
    try:
        process.start()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return process


class _CoreWatch:
    """Whether the core process still runs: ``fd`` turns readable when it exits.

    A child (``process`` given) is watched through its multiprocessing sentinel and reports its exit code; any
    other process through a pidfd (Linux 5.3+), which cannot tell the exit code.
    """

    def __init__(self, pid: int, process: BaseProcess | None = None) -> None:
        self.pid, self.process = pid, process
        if process is not None:
            self.fd = process.sentinel
        else:
            try:
                self.fd = os.pidfd_open(pid)
            except ProcessLookupError:
                raise EngineCoreDeadError(f"the engine core process {pid} is gone") from None

    def exit_description(self) -> str | None:
        """None while the process runs, else how it ended."""
        if self.process is not None:
            return None if self.process.is_alive() else f"exit code {self.process.exitcode}"
        return "it is gone" if select.select([self.fd], [], [], 0)[0] else None

    def close(self) -> None:
        if self.process is None:
            os.close(self.fd)


class MPClient:
    """One front end's connection to the engine core in its own process (an EngineCoreClient)."""

    def __init__(self, config: EngineConfig, addresses: CoreAddresses, client_index: int, watch: _CoreWatch,
                 startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S) -> None:
        """Use ``spawn`` or ``attach``."""
        self.addresses, self.client_index = addresses, client_index
        self._watch = watch
        self._context = zmq.Context()
        self._input = self._context.socket(zmq.PUSH)
        self._input.bind(addresses.input(client_index))
        self._output = self._context.socket(zmq.PULL)
        self._output.bind(addresses.output(client_index))
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(CoreOutput)
        self._poller = zmq.Poller()
        self._poller.register(self._output, zmq.POLLIN)
        self._poller.register(watch.fd, zmq.POLLIN)
        self._unfinished: set[str] = set()  # request ids the core may still produce outputs for
        self._stats = SchedulerStats()
        self._num_inputs_sent = 0
        self._num_inputs_applied = 0
        self._dead_error: EngineCoreDeadError | None = None
        self._closed = False
        try:
            ready = self._wait_ready(startup_timeout_s)
        except BaseException:
            self.shutdown()
            raise
        self.info = ready.info
        self.config = config.with_kv_cache(ready.info.num_kv_blocks, ready.info.num_cpu_blocks)
        logger.info("engine core in process %d", self.core_pid)

    @classmethod
    def spawn(cls, config: EngineConfig, startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S) -> "MPClient":
        """Starts an engine core of its own (this client is its only one) and waits until it is ready."""
        addresses = CoreAddresses.create(num_clients=1)
        return cls.of_process(config, addresses, spawn_engine_core(config, addresses), startup_timeout_s)

    @classmethod
    def of_process(cls, config: EngineConfig, addresses: CoreAddresses, process: BaseProcess,
                   startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S) -> "MPClient":
        """The only client of a core this process already started (``spawn_engine_core``); waits until ready."""
        return cls(config, addresses, 0, _CoreWatch(process.pid, process), startup_timeout_s)

    @classmethod
    def attach(cls, config: EngineConfig, addresses: CoreAddresses, client_index: int, core_pid: int,
               startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S) -> "MPClient":
        """Joins, as client ``client_index``, a core that another process started with ``config``; waits
        until it is ready."""
        return cls(config, addresses, client_index, _CoreWatch(core_pid), startup_timeout_s)

    @property
    def process(self) -> BaseProcess | None:
        """The core process, when this client started it."""
        return self._watch.process

    @property
    def core_pid(self) -> int:
        return self._watch.pid

    @property
    def latest_stats(self) -> SchedulerStats:
        """The scheduler's stats of the last core step received, without handing out its per-step events."""
        return self._stats

    @property
    def num_unfinished(self) -> int:
        """Requests this client added that the core may still produce outputs for."""
        return len(self._unfinished)

    @property
    def poll_handles(self) -> tuple[zmq.Socket, int]:
        """What turns readable when ``step()`` has something to receive: the output socket and the core's exit
        (a caller watching several cores polls these before stepping the one that answered)."""
        return self._output, self._watch.fd

    def _wait_ready(self, timeout_s: float) -> CoreReady:
        message = self._receive(timeout_s)
        if message is None:
            raise TimeoutError(f"the engine core did not start within {timeout_s:.0f} s")
        if not isinstance(message, CoreReady):
            raise EngineCoreDeadError(f"the engine core sent {type(message).__name__} before CoreReady")
        return message

    # ---- the EngineCoreClient contract --------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self._send(AddRequest(request.request_id, request.prompt_token_ids, pickle.dumps(request.sampling_params),
                              request.eos_token_id, request.priority, request.arrival_time,
                              request.parent_request_id,
                              request.lora_request.as_tuple() if request.lora_request is not None else None))
        self._unfinished.add(request.request_id)

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        self._finish(list(request_ids), aborted=True)

    def stop_requests(self, request_ids: Iterable[str]) -> None:
        self._finish(list(request_ids), aborted=False)

    def _finish(self, request_ids: list[str], aborted: bool) -> None:
        if request_ids:
            self._send(FinishRequests(request_ids, aborted))
            self._unfinished.difference_update(request_ids)

    def has_unfinished_requests(self) -> bool:
        return bool(self._unfinished)

    def make_stats(self) -> SchedulerStats:
        """The scheduler's stats as of the last core step received (their per-step events are handed out once)."""
        stats = self._stats
        if stats.kv_cache_events is not None:
            self._stats = dataclasses.replace(stats, kv_cache_events=None)
        return stats

    def step(self) -> list[EngineCoreOutput]:
        """The outputs of every core step received since the last call (see the module docstring on waiting)."""
        outputs: list[EngineCoreOutput] = []
        must_wait = bool(self._unfinished) or self._num_inputs_applied < self._num_inputs_sent
        while True:
            message = self._receive(None if must_wait else 0)
            if message is None:
                break
            if not isinstance(message, CoreStep):
                raise EngineCoreDeadError(f"unexpected {type(message).__name__} from the engine core")
            outputs.extend(message.outputs)
            if self._stats.kv_cache_events is not None and message.stats.kv_cache_events is not None:
                message.stats.kv_cache_events.extend(self._stats.kv_cache_events)  # not reported yet: keep
            self._stats = message.stats
            self._num_inputs_applied = message.num_inputs_applied
            must_wait = not self._unfinished and self._num_inputs_applied < self._num_inputs_sent
        for output in outputs:
            if output.finish_reason is not None:
                self._unfinished.discard(output.req_id)
        return outputs

    # ---- health and lifecycle -------------------------------------------------------------------------------
    def check_health(self) -> None:
        """Raises EngineCoreDeadError if the core process is gone."""
        if self._dead_error is None and not self._closed:
            gone = self._watch.exit_description()
            if gone is not None:
                self._dead_error = EngineCoreDeadError(f"the engine core process exited unexpectedly ({gone})")
        if self._dead_error is not None:
            raise self._dead_error

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Tells the core this client is done; a core this client started is then waited for (it ignores
        SIGTERM) and killed if it does not stop. Idempotent."""
        if self._closed:
            return
        self._closed = True
        core_alive = self._watch.exit_description() is None
        if core_alive:
            try:
                self._input.send(self._encoder.encode(Shutdown()), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        process = self._watch.process
        if process is not None:
            process.join(timeout_s)
            if process.is_alive():
                process.kill()
                process.join(timeout_s)
            self._context.destroy(linger=0)
            self.addresses.remove()
        else:  # the core belongs to the process that started it: let the Shutdown reach it, then go
            self._context.destroy(linger=int(timeout_s * 1000) if core_alive else 0)
        self._watch.close()

    def _send(self, message: CoreInput) -> None:
        self.check_health()
        self._input.send(self._encoder.encode(message), copy=False)
        self._num_inputs_sent += 1

    def _receive(self, timeout_s: float | None) -> CoreOutput | None:
        """The next message, or None after ``timeout_s``; raises EngineCoreDeadError if the core died."""
        self.check_health()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            events = dict(self._poller.poll(None if remaining is None else remaining * 1000))
            if self._output in events:
                message = self._decoder.decode(self._output.recv())
                if isinstance(message, CoreFailed):
                    self._dead_error = EngineCoreDeadError(f"the engine core failed:\n{message.error}")
                    raise self._dead_error
                return message
            if self._watch.fd in events:
                if self._watch.process is not None:
                    self._watch.process.join(1.0)
                self.check_health()  # the core exited without a word (killed): raise
            if deadline is not None and time.monotonic() >= deadline:
                return None
