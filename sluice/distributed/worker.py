"""Ranks 1..N-1 of a tensor-parallel engine: a process that runs whatever rank 0 sends.

    python -m sluice.distributed.worker <fd>      (started by executor.MPExecutor; <fd> is its end of a
                                                    socket pair to rank 0)
    RankActor.run in a Ray actor                  (started by ray_executor.RayExecutor; it connects to rank 0)

It receives (config, rank, world size, init method, parent pid), joins the TP group, builds its
ModelRunner, then answers commands in order: set-up calls (``COMMANDS``, each answered with its result)
and steps (the scheduler's output, no answer: the step's collectives keep the ranks in lock step). A
failure is sent back as a traceback before the process exits 1; so is the loss of rank 0 (its socket
closes, or the parent process is gone). In a Ray actor (``standalone=False``) the loop returns instead of
ending the process: the executor kills the actor.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

logger = logging.getLogger(__name__)

STEP = "step"
SHUTDOWN = "shutdown"


def agreed_num_kv_blocks(runner: Any, cache: Any) -> int:
    """Each rank's own memory probe, then the smallest: every rank allocates the same number of blocks."""
    from sluice.distributed.communication import tp_min_int
    return tp_min_int(runner.determine_num_kv_blocks(cache))


# Set-up calls both sides run together (rank 0 locally, the others here), in this order.
COMMANDS: dict[str, Callable[..., Any]] = {
    "load_model": lambda runner: runner.load_model(),
    "num_kv_blocks": agreed_num_kv_blocks,
    "initialize_kv_cache": lambda runner, num_blocks: runner.initialize_kv_cache(num_blocks),
    "initialize_host_kv_cache": lambda runner, num_blocks: runner.initialize_host_kv_cache(num_blocks),
}


def set_rank_cpu_threads(config: Any, world_size: int) -> None:
    """On the CPU the ranks share the machine: without an explicit --cpu-threads each takes 1/N of the default."""
    from sluice.engine.cpu_threads import resolve_cpu_threads, set_cpu_threads

    if config.model.device != "cpu":
        return
    threads = resolve_cpu_threads(config.model.cpu_threads)
    if threads is not None and config.model.cpu_threads is None:
        threads = max(1, threads // world_size)
    set_cpu_threads(threads)


def _exit_when_parent_dies(parent_pid: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            os._exit(1)  # rank 0 is gone: a collective would wait for it forever


def run_worker(conn: Connection, standalone: bool = True) -> None:
    config, rank, world_size, init_method, parent_pid = conn.recv()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s %(name)s[tp{rank}]: %(message)s")
    if parent_pid is not None:
        threading.Thread(target=_exit_when_parent_dies, args=(parent_pid,), daemon=True).start()
    import torch

    from sluice.distributed.parallel_state import destroy_tp_group, init_tp_group
    from sluice.worker.model_runner import make_model_runner

    set_rank_cpu_threads(config, world_size)
    init_tp_group(rank, world_size, init_method, config.model.device)
    runner = make_model_runner(config)
    with torch.inference_mode():
        while True:
            try:
                command, args = conn.recv()
            except EOFError:
                return
            if command == SHUTDOWN:
                conn.send(("ok", None))
                if not standalone:
                    destroy_tp_group()
                    return
                logging.shutdown()
                os._exit(0)  # nothing left to flush: skip the interpreter's (slow) teardown of torch
            if command == STEP:
                runner.execute(*args)
            else:
                conn.send(("ok", COMMANDS[command](runner, *args)))


def serve_rank(conn: Connection, standalone: bool) -> None:
    """run_worker; a failure goes back to rank 0 as a traceback, then ends the process (or, in an actor, raises)."""
    try:
        run_worker(conn, standalone)
    except BaseException:  # noqa: BLE001 - rank 0 must hear why this rank stopped
        message = traceback.format_exc()
        logger.error("tensor-parallel worker failed:\n%s", message)
        try:
            conn.send(("error", message))
        except OSError:
            pass
        if not standalone:
            raise
        os._exit(1)


def main() -> None:
    serve_rank(Connection(int(sys.argv[1])), standalone=True)


if __name__ == "__main__":
    main()
