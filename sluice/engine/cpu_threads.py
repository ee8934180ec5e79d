"""How many torch threads the process that runs the model uses on the CPU.

torch's own default is one thread per logical CPU, each spinning while it waits for work. Where
other processes want the same cores (an API server tokenizing, a second model, a build), those
spinning threads slow every step several times over. The engine uses the physical cores instead,
unless told otherwise: ``--cpu-threads``, then ``$SLUICE_CPU_THREADS``, then ``$OMP_NUM_THREADS``
(which torch already honours, so it is left alone). "The physical cores" are those of the CPUs the process
may run on (``sched_getaffinity``), capped by a cgroup CPU quota (``cpu.max``) where one is set.
"""
from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

ENV_CPU_THREADS = "SLUICE_CPU_THREADS"


def physical_cores() -> int:
    """Distinct (package, core) pairs of the CPUs this process may run on; the logical count if unknown."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    cores = set()
    for cpu in allowed:
        topology = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        try:
            with open(f"{topology}/physical_package_id") as package, open(f"{topology}/core_id") as core:
                cores.add((package.read().strip(), core.read().strip()))
        except OSError:
            return len(allowed) or os.cpu_count() or 1
    return len(cores) or os.cpu_count() or 1


def cgroup_cpu_quota(cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int | None:
    """CPUs the cgroup (v2) quota allows, rounded up; None without a quota."""
    try:
        with open(cpu_max) as f:
            quota, period = f.read().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, -(-int(quota) // int(period)))


def default_cpu_threads() -> int:
    """The physical cores available to this process, at most the cgroup quota."""
    cores = physical_cores()
    quota = cgroup_cpu_quota()
    return min(cores, quota) if quota is not None else cores


def resolve_cpu_threads(cpu_threads: int | None) -> int | None:
    """The thread count to set, or None to leave torch's (OMP_NUM_THREADS set and no override)."""
    if cpu_threads is not None:
        return cpu_threads
    from_env = os.environ.get(ENV_CPU_THREADS)
    if from_env:
        if not from_env.isdigit() or int(from_env) < 1:
            raise ValueError(f"${ENV_CPU_THREADS} must be a positive integer, got {from_env!r}")
        return int(from_env)
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    return default_cpu_threads()


def set_cpu_threads(cpu_threads: int | None) -> None:
    import torch

    threads = resolve_cpu_threads(cpu_threads)
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
        logger.info("torch uses %d CPU thread(s)", threads)
