"""The API server's side of the process split: CoreClient (EngineCore's interface over ZMQ) and SplitLLMEngine.

    SplitLLMEngine (this process)                         engine-core process (core_proc.py)
      tokenize, validate, n > 1 fan-out                     Scheduler + ModelRunner
      OutputProcessor: detokenize, stop strings             busy loop: drain commands, step, send
      core = CoreClient ------- ipc PUSH: add/finish ------>
                        <------ ipc PULL: CoreStep --------

CoreClient answers the calls LLMEngine makes on an in-process EngineCore (add_request, abort_requests,
stop_requests, has_unfinished_requests, step, make_stats, num_kv_tokens), so the front half of LLMEngine runs
unchanged. ``step()`` returns the outputs of every core step that arrived since the last call, waiting for
at least one while requests are in flight, and with none in flight until the core has applied every command
sent (so the stats after an abort show its freed KV blocks). The core process's sentinel is polled next to
the output socket, so a dead core raises EngineCoreDeadError at once instead of hanging; ``check_health()``
lets an idle caller ask.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import shutil
import tempfile
import time
from collections.abc import Iterable

import msgspec
import zmq

from sluice.config import EngineArgs
from sluice.core.interface import EngineCoreOutput
from sluice.core.request import Request
from sluice.engine.async_engine import EngineDeadError
from sluice.engine.core_proc import (AddRequest, CoreFailed, CoreInput, CoreOutput, CoreReady, CoreStep,
                                     FinishRequests, Shutdown, run_engine_core)
from sluice.engine.llm_engine import LLMEngine
from sluice.engine.stats import SchedulerStats, StatLogger
from sluice.models.model_config import ModelConfig

logger = logging.getLogger(__name__)


class EngineCoreDeadError(EngineDeadError):
    """The engine-core process exited or reported a failure."""


class CoreClient:
    """Starts the engine core in a spawned process and talks to it; the same calls as EngineCore."""

    def __init__(self, args: EngineArgs, startup_timeout_s: float = 600.0) -> None:
        self._socket_dir = tempfile.mkdtemp(prefix="sluice-core-")
        input_address = f"ipc://{self._socket_dir}/input"
        output_address = f"ipc://{self._socket_dir}/output"
        self._context = zmq.Context()
        self._input = self._context.socket(zmq.PUSH)
        self._input.bind(input_address)
        self._output = self._context.socket(zmq.PULL)
        self._output.bind(output_address)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(CoreOutput)
        self.process = multiprocessing.get_context("spawn").Process(
            target=run_engine_core, args=(args, input_address, output_address, os.getpid()),
            name="sluice-engine-core", daemon=True)
        self.process.start()
        self._poller = zmq.Poller()
        self._poller.register(self._output, zmq.POLLIN)
        self._poller.register(self.process.sentinel, zmq.POLLIN)
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
        self.cache_config = ready.cache_config
        self.scheduler_config = ready.scheduler_config
        self.num_parameters = ready.num_parameters
        self.load_seconds = ready.load_seconds
        self.kv_bytes_per_block = ready.kv_bytes_per_block

    def _wait_ready(self, timeout_s: float) -> CoreReady:
        message = self._receive(timeout_s)
        if message is None:
            raise TimeoutError(f"the engine core did not start within {timeout_s:.0f} s")
        if not isinstance(message, CoreReady):
            raise EngineCoreDeadError(f"the engine core sent {type(message).__name__} before CoreReady")
        return message

    @property
    def num_kv_tokens(self) -> int:
        return self.cache_config.num_blocks * self.cache_config.block_size

    # ---- EngineCore's interface --------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self._send(AddRequest(request.request_id, request.prompt_token_ids, pickle.dumps(request.sampling_params),
                              request.eos_token_id, request.priority, request.arrival_time,
                              request.parent_request_id))
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
        """The scheduler's stats as of the last core step received."""
        return self._stats

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
        if self._dead_error is None and not self._closed and not self.process.is_alive():
            self._dead_error = EngineCoreDeadError(
                f"the engine core process exited unexpectedly (exit code {self.process.exitcode})")
        if self._dead_error is not None:
            raise self._dead_error

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Asks the core to stop, then kills it if it does not (it ignores SIGTERM); idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.process.is_alive():
            try:
                self._input.send(self._encoder.encode(Shutdown()), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            self.process.join(timeout_s)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(timeout_s)
        self._context.destroy(linger=0)
        shutil.rmtree(self._socket_dir, ignore_errors=True)

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
            if self.process.sentinel in events:
                self.process.join(1.0)
                self.check_health()  # the core exited without a word (killed): raise
            if deadline is not None and time.monotonic() >= deadline:
                return None


class SplitLLMEngine(LLMEngine):
    """LLMEngine's front half (tokenizer, validation, n > 1, detokenization, stats) over a CoreClient.

    Built like LLMEngine, except that ``core`` is the engine core in its own process.
    """

    def __init__(self, model_config: ModelConfig, args: EngineArgs,
                 stat_loggers: list[StatLogger] | None = None) -> None:
        super().__init__(model_config, args, stat_loggers, core=CoreClient(args))
        logger.info("engine core in process %d", self.core.process.pid)

    def check_health(self) -> None:
        self.core.check_health()

    def shutdown(self) -> None:
        self.core.shutdown()
