"""Triton kernel compiles while a benchmark runs, through Triton's jit hooks.

A kernel variant that start-up did not build is compiled the first time a step needs it, and that
step (with every request in it) waits for the compile: about a second for the attention kernel on
the H100. Loads from Triton's disk cache pass through the same hooks and are logged too (they take
milliseconds). Without Triton (a CPU-only install) the log stays empty.
"""
from __future__ import annotations

import time
from typing import Any


class CompileLog:
    """Use as a context manager; ``step`` is stamped on each event (set it as the run goes)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.step = -1
        self._started = 0.0
        self._knobs = None

    def __enter__(self) -> "CompileLog":
        try:
            import triton
        except ImportError:
            return self
        self._knobs = triton.knobs.runtime
        self._knobs.jit_cache_hook = self._before
        self._knobs.jit_post_compile_hook = self._after
        return self

    def __exit__(self, *exc) -> None:
        if self._knobs is not None:
            self._knobs.jit_cache_hook = None
            self._knobs.jit_post_compile_hook = None

    @property
    def seconds(self) -> float:
        return self.totals(self.events)["seconds"]

    @property
    def during_run(self) -> list[dict[str, Any]]:
        """The compiles stamped with a step (``step`` >= 0): each one stalled that step."""
        return [event for event in self.events if event["step"] >= 0]

    @staticmethod
    def totals(events: list[dict[str, Any]]) -> dict[str, float]:
        return {"count": len(events), "seconds": sum(event["seconds"] for event in events)}

    def _before(self, **kwargs) -> None:
        self._started = time.perf_counter()
        return None  # a true value would tell Triton to skip the compile

    def _after(self, **kwargs) -> None:
        self.events.append({"step": self.step, "kernel": kwargs["fn"].name,
                            "seconds": time.perf_counter() - self._started, "variant": kwargs["repr"][:400]})
