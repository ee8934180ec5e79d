"""The errors the engine's fronts raise, in one module that imports nothing else of the engine, so that
the async front, the engine-core clients and the server's handlers can all name them without importing
each other."""
from __future__ import annotations


class EngineDeadError(RuntimeError):
    """The engine died (its thread failed, or its core process exited); no request can make progress."""


class EngineCoreDeadError(EngineDeadError):
    """The engine-core process exited or reported a failure."""


class QueueFullError(RuntimeError):
    """Admission control refused a request: too many requests are already waiting."""


class RequestAbortedError(RuntimeError):
    """The server aborted an in-flight request (a drain ran out of time)."""
