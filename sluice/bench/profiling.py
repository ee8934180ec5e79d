"""What a benchmark run's steps spent their time on, besides the model: kernels under torch.profiler, and
Python's garbage collections (a full one walks every object the process tracks and stalls the step loop)."""
from __future__ import annotations

import gc
import time
from typing import Any


def device_kernel_times(prof: Any, num_steps: int, top: int = 25) -> tuple[float, list[dict[str, Any]]]:
    """(milliseconds of kernels and copies per step, the ``top`` kernels by time: microseconds and launches per
    step) from a finished torch.profiler ``prof`` that covered ``num_steps`` steps."""
    import torch

    per_kernel: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = per_kernel.setdefault(event.name, [0.0, 0])
            entry[0] += event.time_range.elapsed_us()
            entry[1] += 1
    total_us = sum(us for us, _ in per_kernel.values())
    ranked = sorted(per_kernel.items(), key=lambda item: -item[1][0])[:top]
    kernels = [{"name": name[:120], "us_per_step": us / num_steps, "launches_per_step": n / num_steps}
               for name, (us, n) in ranked]
    return total_us / 1e3 / num_steps, kernels


class GcLog:
    """Python's garbage collections while installed (``with GcLog() as log``): each one's generation, seconds,
    and the step it delayed (set ``log.step`` before each step; -1 before the first)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.step = -1
        self._start = 0.0

    def __enter__(self) -> "GcLog":
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.events.append({"generation": info["generation"], "seconds": time.perf_counter() - self._start,
                                "step": self.step})

    def totals(self) -> dict[str, dict[str, float]]:
        """generation -> count, seconds and the longest one, over the collections at steps >= 0."""
        by_generation: dict[str, dict[str, float]] = {}
        for event in self.events:
            if event["step"] < 0:
                continue
            entry = by_generation.setdefault(str(event["generation"]), {"count": 0, "seconds": 0.0, "max_s": 0.0})
            entry["count"] += 1
            entry["seconds"] += event["seconds"]
            entry["max_s"] = max(entry["max_s"], event["seconds"])
        return by_generation
