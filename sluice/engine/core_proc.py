"""The engine core in its own process, and the messages it exchanges with the API server's front end.

    API server process (core_client.py)                engine-core process (this file)
    ----------------------------------                 --------------------------------
    CoreClient.add_request / abort / stop  --PUSH-->   PULL  input socket:  AddRequest | FinishRequests | Shutdown
    CoreClient.step()                      <--PULL--   PUSH  output socket: CoreReady, then one CoreStep per step

The core owns the scheduler and the model runner and knows only token ids. Its busy loop blocks on the input
socket while it has nothing to run (waking each second to check that the front end still exists), then drains
every queued command, runs one step and sends that step's outputs together with the scheduler's stats. A batch of
commands on an idle core also gets a CoreStep, so the front sees the KV blocks an abort freed.

Encoding: msgspec msgpack for every message. SamplingParams travel pickled inside AddRequest: msgspec leaves out
a dataclass's underscore fields (``_all_stop_token_ids``, ``_bad_words_token_ids``, which the front fills in), and a
pickle round trip of one SamplingParams costs the same as msgspec's (about 10 us each, measured here). The hot path,
a step's outputs, is msgspec: 256 EngineCoreOutputs encode and decode in about 0.2 ms against 0.6 ms with pickle.
"""
from __future__ import annotations

import logging
import os
import pickle
import signal
import traceback

import msgspec
import zmq

from sluice.config import CacheConfig, EngineArgs, SchedulerConfig
from sluice.core.interface import EngineCoreOutput
from sluice.engine.stats import SchedulerStats

logger = logging.getLogger(__name__)

_PARENT_CHECK_MS = 1000  # how often an idle core checks that its front end still exists


# ---- front end -> core -----------------------------------------------------------------------------------
class AddRequest(msgspec.Struct, tag="add", array_like=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: bytes  # pickled SamplingParams (see the module docstring)
    eos_token_id: int | None
    priority: int
    arrival_time: float  # time.monotonic(): one clock for every process of the machine
    parent_request_id: str | None  # set for the children of an n > 1 request


class FinishRequests(msgspec.Struct, tag="finish", array_like=True):
    request_ids: list[str]
    aborted: bool  # True: the client went away; False: the front end matched a stop string


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True):
    pass


CoreInput = AddRequest | FinishRequests | Shutdown


# ---- core -> front end -----------------------------------------------------------------------------------
class CoreReady(msgspec.Struct, tag="ready", array_like=True):
    """Sent once the model is loaded and the KV cache sized: what the front end validates requests against."""
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    num_parameters: int
    load_seconds: float
    kv_bytes_per_block: int


class CoreStep(msgspec.Struct, tag="step", array_like=True):
    outputs: list[EngineCoreOutput]
    stats: SchedulerStats
    num_inputs_applied: int  # input messages applied so far: the front knows when the stats include its abort


class CoreFailed(msgspec.Struct, tag="failed", array_like=True):
    error: str  # the traceback, for the front end's log


CoreOutput = CoreReady | CoreStep | CoreFailed


# ---- the process -----------------------------------------------------------------------------------------
def run_engine_core(args: EngineArgs, input_address: str, output_address: str, parent_pid: int) -> None:
    """The spawned process's entry point: build the core, report ready (or the failure), run the busy loop."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s[core]: %(message)s")
    # Ctrl-C and a SIGTERM to the process group are the API server's to handle (it drains, then sends Shutdown);
    # the core must outlive them so in-flight requests can finish.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    context = zmq.Context()
    input_socket = context.socket(zmq.PULL)
    input_socket.connect(input_address)
    output_socket = context.socket(zmq.PUSH)
    output_socket.connect(output_address)
    encoder = msgspec.msgpack.Encoder()
    try:
        from sluice.engine.engine_core import EngineCore
        from sluice.models.model_config import ModelConfig

        core = EngineCore(ModelConfig.from_engine_args(args), args)
        runner = core.runner
        output_socket.send(encoder.encode(CoreReady(
            core.cache_config, core.scheduler_config, runner.num_parameters, runner.load_seconds,
            runner.kv_spec.bytes_per_block)))
        _busy_loop(core, input_socket, output_socket, parent_pid)
    except BaseException:  # noqa: BLE001 - the front end must hear why the core stopped
        logger.exception("engine core failed")
        output_socket.send(encoder.encode(CoreFailed(traceback.format_exc())))
        output_socket.close(linger=1000)
        context.term()
        os._exit(1)  # skip interpreter teardown: the front end is waiting for the exit code
    output_socket.close(linger=1000)
    input_socket.close(linger=0)
    context.term()


def _busy_loop(core, input_socket: zmq.Socket, output_socket: zmq.Socket, parent_pid: int) -> None:
    decoder = msgspec.msgpack.Decoder(CoreInput)
    encoder = msgspec.msgpack.Encoder()
    num_inputs_applied = 0
    while True:
        idle = not core.has_unfinished_requests()
        if idle:
            while not input_socket.poll(_PARENT_CHECK_MS):
                if os.getppid() != parent_pid:
                    logger.warning("the API server process is gone; the engine core exits")
                    return
        messages = []
        while True:
            try:
                messages.append(decoder.decode(input_socket.recv(zmq.NOBLOCK)))
            except zmq.Again:
                break
        for message in messages:
            if isinstance(message, Shutdown):
                return
            _apply(core, message)
        num_inputs_applied += len(messages)
        outputs = core.step() if core.has_unfinished_requests() else []
        output_socket.send(encoder.encode(CoreStep(outputs, core.make_stats(), num_inputs_applied)), copy=False)


def _apply(core, message: AddRequest | FinishRequests) -> None:
    from sluice.core.request import Request

    if isinstance(message, AddRequest):
        core.add_request(Request(message.request_id, message.prompt_token_ids, pickle.loads(message.sampling_params),
                                 eos_token_id=message.eos_token_id, priority=message.priority,
                                 arrival_time=message.arrival_time,
                                 parent_request_id=message.parent_request_id))
    elif message.aborted:
        core.abort_requests(message.request_ids)
    else:
        core.stop_requests(message.request_ids)

