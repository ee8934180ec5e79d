"""The engine core in its own process, and the messages it exchanges with its front-end clients.

    front end i (core_client.py)                         engine-core process (this file)
    ----------------------------                         --------------------------------
    MPClient.add_request / abort / stop    --PUSH i-->   PULL input i:   AddRequest | FinishRequests | Shutdown
    MPClient.step()                        <--PULL i--   PUSH output i:  CoreReady, then CoreSteps

One front end (``sluice serve``, the default) is client 0. With ``--api-server-count N`` every API server
process is a client with its own pair of sockets; the core remembers which client added each request and sends
each client only its own requests' outputs (ClientRouter); it then also writes the scheduler's Prometheus series
itself (sluice/metrics.py). The core owns the scheduler and the model runner and
knows only token ids. Its busy loop blocks on the input sockets while it has nothing to run (waking each second
to check that its parent process still exists), then drains every queued command, runs one step and sends that
step's outputs together with the scheduler's stats. A client gets a CoreStep when the step has outputs for it,
when it sent commands since the last one (so it sees the KV blocks an abort freed), or while it has requests in
the core; a client with nothing in flight is left alone. The core exits once every client has sent Shutdown.

Encoding: msgspec msgpack for every message. SamplingParams travel pickled inside AddRequest: msgspec leaves out
a dataclass's underscore fields (``_all_stop_token_ids``, ``_bad_words_token_ids``, which the front fills in), and a
pickle round trip of one SamplingParams costs the same as msgspec's (about 10 us each, measured here). The hot path,
a step's outputs, is msgspec: 256 EngineCoreOutputs encode and decode in about 0.2 ms against 0.6 ms with pickle.
"""
from __future__ import annotations

import logging
import os
import pickle
import shutil
import signal
import tempfile
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec
import zmq

from sluice.config import EngineConfig
from sluice.core.interface import FINISH_REASON_ERROR, EngineCoreOutput
from sluice.engine.engine_core import EngineCore, EngineCoreInfo
from sluice.engine.gc_heap import freeze_startup_heap
from sluice.stats import SchedulerStats

if TYPE_CHECKING:
    from sluice.metrics import SchedulerMetrics

logger = logging.getLogger(__name__)

_PARENT_CHECK_MS = 1000  # how often an idle core checks that its parent process still exists


# ---- front end -> core -----------------------------------------------------------------------------------
class AddRequest(msgspec.Struct, tag="add", array_like=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: bytes  # pickled SamplingParams (see the module docstring)
    eos_token_id: int | None
    priority: int
    arrival_time: float  # time.monotonic(): one clock for every process of the machine
    parent_request_id: str | None  # set for the children of an n > 1 request
    lora: tuple[str, int, str, str | None] | None = None  # LoRARequest.as_tuple() (None: the base model)


class FinishRequests(msgspec.Struct, tag="finish", array_like=True):
    request_ids: list[str]
    aborted: bool  # True: the client went away; False: the front end matched a stop string


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True):
    pass  # this client is done; its requests still in the core are aborted


CoreInput = AddRequest | FinishRequests | Shutdown


# ---- core -> front end -----------------------------------------------------------------------------------
class CoreReady(msgspec.Struct, tag="ready", array_like=True):
    """Sent once the model is loaded and the KV cache sized: the numbers only the core knows. The front end
    already holds the resolved EngineConfig (the core was started with it) and applies them to it."""
    info: EngineCoreInfo


class CoreStep(msgspec.Struct, tag="step", array_like=True):
    outputs: list[EngineCoreOutput]  # this client's requests only
    stats: SchedulerStats
    num_inputs_applied: int  # this client's input messages applied so far: it knows when the stats include its abort


class CoreFailed(msgspec.Struct, tag="failed", array_like=True):
    error: str  # the traceback, for the front end's log


CoreOutput = CoreReady | CoreStep | CoreFailed


# ---- where the sockets live ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CoreAddresses:
    """The ipc endpoints of one core and its clients: client i binds ``input(i)`` and ``output(i)``."""
    socket_dir: str
    num_clients: int

    @classmethod
    def create(cls, num_clients: int) -> "CoreAddresses":
        return cls(tempfile.mkdtemp(prefix="sluice-core-"), num_clients)

    def input(self, client_index: int) -> str:
        return f"ipc://{self.socket_dir}/input-{client_index}"

    def output(self, client_index: int) -> str:
        return f"ipc://{self.socket_dir}/output-{client_index}"

    def remove(self) -> None:
        shutil.rmtree(self.socket_dir, ignore_errors=True)


# ---- which client a request belongs to -------------------------------------------------------------------------
class ClientRouter:
    """Remembers which client added each request and splits a step's outputs by client.

    With one client there is nothing to remember: every step goes to it.
    """

    def __init__(self, num_clients: int) -> None:
        self.num_clients = num_clients
        self._owner: dict[str, int] = {}
        self._num_owned = [0] * num_clients
        self._open = [True] * num_clients

    @property
    def all_closed(self) -> bool:
        return not any(self._open)

    def add(self, request_id: str, client: int) -> None:
        if self.num_clients > 1:
            self._owner[request_id] = client
            self._num_owned[client] += 1

    def forget(self, request_ids: list[str]) -> None:
        if self.num_clients > 1:
            for request_id in request_ids:
                client = self._owner.pop(request_id, None)
                if client is not None:
                    self._num_owned[client] -= 1

    def close(self, client: int) -> list[str]:
        """Marks a client gone; returns its requests still in the core (to abort)."""
        self._open[client] = False
        owned = [request_id for request_id, owner in self._owner.items() if owner == client]
        self.forget(owned)
        return owned

    def route(self, outputs: list[EngineCoreOutput], senders: set[int]) -> list[tuple[int, list[EngineCoreOutput]]]:
        """(client, its outputs) for every client that gets a CoreStep this turn (see the module docstring)."""
        if self.num_clients == 1:
            return [(0, outputs)] if self._open[0] else []
        per_client: list[list[EngineCoreOutput]] = [[] for _ in range(self.num_clients)]
        finished = []
        for output in outputs:
            client = self._owner.get(output.req_id)
            if client is not None:
                per_client[client].append(output)
                if output.finish_reason is not None:
                    finished.append(output.req_id)
        recipients = [c for c in range(self.num_clients) if self._open[c] and
                      (per_client[c] or c in senders or self._num_owned[c])]
        self.forget(finished)
        return [(c, per_client[c]) for c in recipients]


# ---- the process -----------------------------------------------------------------------------------------
@dataclass
class _ClientSockets:
    input: zmq.Socket
    output: zmq.Socket
    num_inputs_applied: int = 0


def run_engine_core(config: EngineConfig, addresses: CoreAddresses, parent_pid: int,
                    export_metrics: bool = False, engine_index: int | None = None) -> None:
    """The spawned process's entry point: build the core, report ready (or the failure), run the busy loop.

    ``export_metrics``: write the scheduler's Prometheus series (several API servers share this core, and
    prometheus_client runs in multiprocess mode), labelled ``engine`` with ``engine_index`` when given (one of
    several data-parallel cores)."""
    core_name = "core" if engine_index is None else f"core-{engine_index}"
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s %(name)s[{core_name}]: %(message)s")
    # Ctrl-C and a SIGTERM to the process group are the API servers' to handle (they drain, then send Shutdown);
    # the core must outlive them so in-flight requests can finish.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    context = zmq.Context()
    clients = []
    for index in range(addresses.num_clients):
        input_socket = context.socket(zmq.PULL)
        input_socket.connect(addresses.input(index))
        output_socket = context.socket(zmq.PUSH)
        output_socket.connect(addresses.output(index))
        clients.append(_ClientSockets(input_socket, output_socket))
    encoder = msgspec.msgpack.Encoder()
    try:
        core = EngineCore(config)
        ready = encoder.encode(CoreReady(core.info))
        metrics = None
        if export_metrics:  # before ready: the API servers' /metrics has the series from their first answer
            from sluice.metrics import SchedulerMetrics
            metrics = SchedulerMetrics(config.model.served_model_name, engine_index=engine_index)
        freeze_startup_heap()  # no 0.3 s collections of the start-up heap between steps
        for client in clients:
            client.output.send(ready)
        _busy_loop(core, clients, parent_pid, metrics)
    except BaseException:  # noqa: BLE001 - the front ends must hear why the core stopped
        logger.exception("engine core failed")
        failed = encoder.encode(CoreFailed(traceback.format_exc()))
        for client in clients:
            try:
                client.output.send(failed, zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # that client is not listening: it sees the exit instead
        context.destroy(linger=1000)
        os._exit(1)  # skip interpreter teardown: the front ends are waiting for the exit code
    for client in clients:
        client.output.close(linger=1000)
        client.input.close(linger=0)
    context.term()


def _busy_loop(core: EngineCore, clients: list[_ClientSockets], parent_pid: int, metrics: SchedulerMetrics | None) -> None:
    decoder = msgspec.msgpack.Decoder(CoreInput)
    encoder = msgspec.msgpack.Encoder()
    router = ClientRouter(len(clients))
    poller = zmq.Poller()
    for client in clients:
        poller.register(client.input, zmq.POLLIN)
    while True:
        if not core.has_unfinished_requests():
            while not poller.poll(_PARENT_CHECK_MS):
                if os.getppid() != parent_pid:
                    logger.warning("the process that started the engine core is gone; the engine core exits")
                    return
        senders: set[int] = set()
        failed: list[EngineCoreOutput] = []
        for index, client in enumerate(clients):
            num_applied = _apply_queued(core, router, index, client.input, decoder, failed)
            if num_applied:
                client.num_inputs_applied += num_applied
                senders.add(index)
        if router.all_closed:
            return
        outputs = core.step() if core.has_unfinished_requests() else []
        outputs = failed + outputs if failed else outputs
        stats = core.make_stats()
        for index, client_outputs in router.route(outputs, senders):
            client = clients[index]
            message = CoreStep(client_outputs, stats, client.num_inputs_applied)
            client.output.send(encoder.encode(message), copy=False)
        if metrics is not None:
            metrics.record(stats)


def _apply_queued(core: EngineCore, router: ClientRouter, client: int, input_socket: zmq.Socket,
                  decoder: msgspec.msgpack.Decoder, failed: list[EngineCoreOutput]) -> int:
    """Applies every message the client has queued; returns how many there were. A request that cannot be
    added gets a finish_reason "error" output in ``failed`` (sent with this turn's step)."""
    from sluice.core.request import Request
    from sluice.lora.request import LoRARequest

    num_messages = 0
    while True:
        try:
            message = decoder.decode(input_socket.recv(zmq.NOBLOCK))
        except zmq.Again:
            return num_messages
        num_messages += 1
        if isinstance(message, AddRequest):
            router.add(message.request_id, client)
            try:
                core.add_request(Request(message.request_id, message.prompt_token_ids,
                                         pickle.loads(message.sampling_params), eos_token_id=message.eos_token_id,
                                         priority=message.priority, arrival_time=message.arrival_time,
                                         parent_request_id=message.parent_request_id,
                                         lora_request=LoRARequest.from_tuple(message.lora) if message.lora else None))
            except Exception:  # noqa: BLE001 - one request's failure finishes that request, never the core
                logger.exception("request %s could not be added; it finishes with an error", message.request_id)
                core.abort_requests([message.request_id])  # in case it got part of the way in
                failed.append(EngineCoreOutput(message.request_id, [], finish_reason=FINISH_REASON_ERROR))
        elif isinstance(message, FinishRequests):
            router.forget(message.request_ids)
            if message.aborted:
                core.abort_requests(message.request_ids)
            else:
                core.stop_requests(message.request_ids)
        else:  # Shutdown: nothing this client sends later counts
            left_over = router.close(client)
            if left_over:
                core.abort_requests(left_over)
            return num_messages
