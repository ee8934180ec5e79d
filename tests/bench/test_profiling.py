"""Benchmark profiling helpers: garbage collections by step, kernel tables from a profiler's events."""
from __future__ import annotations

import gc
from types import SimpleNamespace

import torch

from sluice.bench.profiling import GcLog, device_kernel_times


def test_gc_log_records_collections_with_their_step_and_removes_its_hook():
    with GcLog() as log:
        gc.collect()  # before the first step: start-up, left out of the totals
        log.step = 7
        gc.collect()
        gc.collect(0)
    assert log._callback not in gc.callbacks
    assert [(e["generation"], e["step"]) for e in log.events] == [(2, -1), (2, 7), (0, 7)]
    assert all(e["seconds"] >= 0 for e in log.events)
    totals = log.totals()
    assert {generation: entry["count"] for generation, entry in totals.items()} == {"2": 1, "0": 1}


def _event(name: str, us: float, cuda: bool = True):
    device = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    return SimpleNamespace(name=name, device_type=device, time_range=SimpleNamespace(elapsed_us=lambda: us))


def test_device_kernel_times_sums_device_events_per_step_and_ranks_kernels():
    prof = SimpleNamespace(events=lambda: [_event("gemm", 300.0), _event("attn", 100.0), _event("gemm", 300.0),
                                           _event("host_op", 5000.0, cuda=False), _event("norm", 20.0)])
    busy_ms, kernels = device_kernel_times(prof, num_steps=2, top=2)
    assert busy_ms == (300 + 100 + 300 + 20) / 1e3 / 2
    assert kernels == [{"name": "gemm", "us_per_step": 300.0, "launches_per_step": 1.0},
                       {"name": "attn", "us_per_step": 50.0, "launches_per_step": 0.5}]
