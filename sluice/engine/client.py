"""The one contract between the front end (tokenization, validation, detokenization) and the engine core.

    LLMEngine / AsyncLLM  --EngineCoreClient-->  InprocClient  --calls-->        EngineCore (this process)
                                                 MPClient      --ZMQ + msgspec--> EngineCore (own process)

``make_engine_core_client(config, ...)`` is the one place that picks the implementation: ``LLM`` and
``--no-process-split`` get an InprocClient, ``sluice serve`` an MPClient that starts its own core, and each
API server of ``--api-server-count N`` an MPClient attached to the core its parent started. Whichever it
is, ``client.config`` is the resolved EngineConfig with the KV cache sized by the core (the numbers the
front end validates against) and ``client.info`` what the core reported when it became ready.

Per-request outcomes travel as EngineCoreOutputs from ``step()``; a failure of one request belongs in its
output (finish reason and message), never in an exception from ``step()``, which means the core is gone.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from sluice.config import EngineConfig
from sluice.core.interface import EngineCoreOutput
from sluice.core.request import Request
from sluice.engine.engine_core import EngineCore, EngineCoreInfo
from sluice.stats import SchedulerStats


class EngineCoreClient(Protocol):
    """What the front end may ask of the engine core, in process or across processes."""
    config: EngineConfig  # resolved, KV cache sized: what requests are validated against
    info: EngineCoreInfo

    def add_request(self, request: Request) -> None:
        """Queues a validated request (token ids and SamplingParams) for the scheduler."""

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        """Ends requests whose client went away; their KV blocks are freed."""

    def stop_requests(self, request_ids: Iterable[str]) -> None:
        """Ends requests the front end stopped (a stop string matched): finish reason stop."""

    def has_unfinished_requests(self) -> bool: ...

    def step(self) -> list[EngineCoreOutput]:
        """The outputs of the core's steps since the last call (one step in process)."""

    def make_stats(self) -> SchedulerStats:
        """The scheduler's stats as of the last step."""

    def check_health(self) -> None:
        """Raises EngineDeadError when the core is gone (never for an in-process core)."""

    def shutdown(self) -> None:
        """Releases the core; idempotent."""


class InprocClient:
    """The engine core in this process: every call is a direct call."""

    def __init__(self, config: EngineConfig) -> None:
        self.engine_core = EngineCore(config)
        self.config = self.engine_core.config
        self.info = self.engine_core.info

    def add_request(self, request: Request) -> None:
        self.engine_core.add_request(request)

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        self.engine_core.abort_requests(request_ids)

    def stop_requests(self, request_ids: Iterable[str]) -> None:
        self.engine_core.stop_requests(request_ids)

    def has_unfinished_requests(self) -> bool:
        return self.engine_core.has_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        return self.engine_core.step()

    def make_stats(self) -> SchedulerStats:
        return self.engine_core.make_stats()

    def check_health(self) -> None:
        pass  # a failure of this core raises from the call that hit it

    def shutdown(self) -> None:
        self.engine_core.shutdown()


@dataclass(frozen=True)
class CoreAttachment:
    """A core another process started, for one of its several API servers to attach to as client ``index``."""
    addresses: object  # core_proc.CoreAddresses
    index: int
    core_pid: int


def make_engine_core_client(config: EngineConfig, process_split: bool = False,
                            attach: CoreAttachment | list[CoreAttachment] | None = None) -> EngineCoreClient:
    """The client for ``config``: in process by default, a core process of its own with ``process_split``,
    or the shared core of ``attach``. With ``data_parallel_size`` N above 1: N core processes of its own, or
    the N shared cores of ``attach`` (a list), behind a DPClient (engine/dp_client.py)."""
    if config.parallel.data_parallel_size > 1:
        from sluice.engine.dp_client import DPClient

        return DPClient.spawn(config) if attach is None else DPClient.attach(config, attach)
    if attach is None and not process_split:
        return InprocClient(config)
    from sluice.engine.core_client import MPClient

    if isinstance(attach, list):
        (attach,) = attach
    if attach is not None:
        return MPClient.attach(config, attach.addresses, attach.index, attach.core_pid)
    return MPClient.spawn(config)
