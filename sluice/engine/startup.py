"""Start-up time by phase: the engine core's phases and the process's age when it is ready to serve.

    config -> weights -> profiling -> kv_cache -> graph_capture      (EngineCore.__init__)
    ready: seconds from the process's start (interpreter, imports, tokenizer, engine) to serving

The phases go to the log and, through ``EngineCoreInfo.startup_seconds`` (the core's ready message) and the
stat loggers' ``EngineInfo``, to ``sluice:engine_startup_seconds``.
"""
from __future__ import annotations

import os
import time


class StartupTimer:
    """Laps of time.perf_counter, each under a phase name."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> float:
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        self.phases[phase] = self.phases.get(phase, 0.0) + seconds
        return seconds

    def split_graph_capture(self, captured: float) -> None:
        """The last lap allocated the KV cache and then captured CUDA graphs (``captured`` seconds of it,
        ModelRunner.graph_capture_seconds): keeps the two apart."""
        both = self.phases.pop("graph_capture", 0.0)
        captured = min(captured, both)
        self.phases["kv_cache"] = both - captured
        self.phases["graph_capture"] = captured

    def describe(self) -> str:
        total = sum(self.phases.values())
        return ", ".join(f"{name} {seconds:.2f} s" for name, seconds in self.phases.items()) + f" (total {total:.2f} s)"


def process_age_seconds() -> float | None:
    """Seconds since this process started (Linux /proc), or None where that cannot be read."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of stat(5), counted after the command name
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
