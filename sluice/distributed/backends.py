"""The executor of ``--distributed-executor-backend``: rank 0 of a tensor-parallel engine, by how it starts
ranks 1..N-1 (mp: child processes, executor.py; ray: Ray actors, ray_executor.py, imported only when chosen)."""
from __future__ import annotations

from typing import Any

from sluice.distributed.executor import MPExecutor, TPExecutor


def make_tp_executor(config: Any) -> TPExecutor:
    if config.parallel.distributed_executor_backend == "ray":
        from sluice.distributed.ray_executor import RayExecutor
        return RayExecutor(config)
    return MPExecutor(config)
