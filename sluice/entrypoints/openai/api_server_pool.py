"""`sluice serve --api-server-count N`: N API server processes in front of one engine-core process, one port;
with `--data-parallel-size D`, in front of D engine-core processes.

    parent process (run_api_server_pool)
      binds N listening sockets on host:port (SO_REUSEPORT: the kernel spreads new connections over them)
      starts the D engine cores (engine/core_proc.py), each with N clients and its own devices
      (dp_client.core_env), then N API servers (run_api_server_worker)
      forwards SIGTERM / SIGINT to the API servers, watches every child, exits with their verdict

    API server i: the single-process server (api_server.serve) on socket i, over an MPClient attached as client i
      (api_server.run_api_server_worker; this module never imports api_server, which starts the pool):
      HTTP, tokenization, detokenization, streaming for the connections it accepted; request ids carry i;
      with D > 1 a DPClient over D such MPClients routes each request to a core (engine/dp_client.py)

Shutdown: the first SIGTERM (or Ctrl-C, which the API servers leave to the parent) reaches every API server as
SIGTERM: each drains its own requests as one server does, sends the core Shutdown and exits 0; the core exits
once all of them have; the parent exits 0. A second signal is forwarded too (each API server exits at once).

A killed engine core (any of the D): every API server sees it through a pidfd, answers /health with 503 and exits 1
after ``DEAD_ENGINE_GRACE_S``; the parent exits 1. An API server that exits with an error takes the others down
(drained, with SIGTERM) and the parent exits 1.

/metrics: prometheus_client's multiprocess mode over a directory the parent creates and removes; each API
server's /metrics shows the whole server: the request series summed over the API servers, the scheduler's
series as the engine core writes them (see sluice/metrics.py), with D > 1 each core's labelled ``engine``.
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from multiprocessing.process import BaseProcess
from typing import Any, Callable

from sluice.config import EngineConfig
from sluice.engine.core_client import spawn_engine_core
from sluice.engine.core_proc import CoreAddresses
from sluice.engine.dp_client import core_env
from sluice.metrics import MULTIPROC_DIR_ENV

logger = logging.getLogger("sluice.server")

DEAD_ENGINE_GRACE_S = 1.0  # a dead engine's server keeps answering 503 this long (health checks see it), then exits
# The API server process's entry point: (args, config, index, socket, [(core addresses, core pid) per engine core])
# -> never returns.
WorkerMain = Callable[[argparse.Namespace, EngineConfig, int, socket.socket, list[tuple[CoreAddresses, int]]], None]

_CORE_EXIT_WAIT_S = 10.0  # after the last API server exits, the core has this long to follow before it is killed
_DEAD_CORE_WAIT_S = DEAD_ENGINE_GRACE_S + 30.0  # API servers that outlive a dead core this long are killed
_LISTEN_BACKLOG = 2048  # uvicorn's default
_POLL_S = 0.1  # how often the parent looks at its children


def bind_listening_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` listening sockets on one address, so a port already taken fails here, before anything starts.
    Port 0 picks a free port for the first socket and the others share it."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
            sock.listen(_LISTEN_BACKLOG)
            address = sock.getsockname()
    except OSError as e:
        for sock in sockets:
            sock.close()
        raise ValueError(f"--port: cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sockets


def run_api_server_pool(args: argparse.Namespace, config: EngineConfig, worker_main: WorkerMain) -> int:
    """The parent process: starts the core with the resolved ``config``, then the API servers (``worker_main``,
    which get the same config), supervises them; returns the exit code."""
    sockets = bind_listening_sockets(args.host, args.port, args.api_server_count)
    metrics_dir = tempfile.mkdtemp(prefix="sluice-metrics-")
    os.environ[MULTIPROC_DIR_ENV] = metrics_dir  # inherited by the API servers (see sluice/metrics.py)
    addresses = [CoreAddresses.create(args.api_server_count) for _ in range(config.parallel.data_parallel_size)]
    pool = _ProcessPool()
    try:
        pool.start(args, config, worker_main, sockets, addresses)
        return pool.supervise()
    finally:
        for sock in sockets:
            sock.close()
        pool.kill_leftovers()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        for core_addresses in addresses:
            core_addresses.remove()


class _ProcessPool:
    """The engine cores and the API server processes, as the parent sees them."""

    def __init__(self) -> None:
        self.cores: list[BaseProcess] = []
        self.workers: list[BaseProcess] = []
        self.stopping = False  # a shutdown signal arrived: API servers killed by the forwarded SIGTERM are fine

    def start(self, args: argparse.Namespace, config: EngineConfig, worker_main: WorkerMain,
              sockets: list[socket.socket], addresses: list[CoreAddresses]) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.forward_signal)
        data_parallel = len(addresses) > 1
        for index, core_addresses in enumerate(addresses):
            self.cores.append(spawn_engine_core(config, core_addresses, export_metrics=True,
                                                engine_index=index if data_parallel else None,
                                                env=core_env(config, index) if data_parallel else None))
        cores = [(core_addresses, core.pid) for core_addresses, core in zip(addresses, self.cores)]
        logger.info("engine core%s in process%s %s; %d API servers on http://%s:%d", "s" if data_parallel else "",
                    "es" if data_parallel else "", ", ".join(str(core.pid) for core in self.cores), len(sockets),
                    args.host, sockets[0].getsockname()[1])
        spawn = multiprocessing.get_context("spawn")
        for index, sock in enumerate(sockets):
            # Not daemonic: an API server starts processes of its own (the chat template render pool); this
            # parent ends every one it started (kill_leftovers) whatever way it exits.
            worker = spawn.Process(target=worker_main, name=f"sluice-api-server-{index}", daemon=False,
                                   args=(args, config, index, sock, cores))
            worker.start()
            self.workers.append(worker)
            if self.stopping:  # the signal came while it was starting
                self._terminate(worker)

    def forward_signal(self, sig: int, frame: Any) -> None:
        """SIGTERM / SIGINT to the parent: SIGTERM to every API server (each drains on its own)."""
        self.stopping = True
        for worker in self.workers:
            self._terminate(worker)

    @staticmethod
    def _terminate(worker: BaseProcess) -> None:
        if worker.exitcode is None:
            try:
                os.kill(worker.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def supervise(self) -> int:
        """Waits for every API server, then the cores. 0 only if all of them ended cleanly."""
        workers = self.workers
        failed = False
        core_dead_since: float | None = None
        while any(worker.exitcode is None for worker in workers):
            time.sleep(_POLL_S)  # polled: waiting on the children's sentinels spun here while one was exiting
            dead = [core for core in self.cores if not core.is_alive() and core.exitcode != 0]
            if core_dead_since is None and dead:
                # (A core exits 0 only after every API server said Shutdown.) Each API server notices on its own,
                # answers 503 for a grace period and exits 1.
                core_dead_since, failed = time.monotonic(), True
                logger.error("the engine core %s exited unexpectedly (exit code %s)", dead[0].name, dead[0].exitcode)
            if core_dead_since is not None:
                if time.monotonic() - core_dead_since > _DEAD_CORE_WAIT_S:
                    for worker in workers:
                        if worker.exitcode is None:
                            worker.kill()
                continue
            bad = [w for w in workers
                   if w.exitcode not in (None, 0) and not (self.stopping and w.exitcode == -signal.SIGTERM)]
            if bad and not failed:
                failed = True
                logger.error("API server process %d exited with %d; stopping the others", bad[0].pid,
                             bad[0].exitcode)
                self.forward_signal(signal.SIGTERM, None)
        deadline = time.monotonic() + _CORE_EXIT_WAIT_S
        for core in self.cores:
            core.join(max(0.0, deadline - time.monotonic()))  # it exits once every API server has said Shutdown
            if core.is_alive():
                logger.warning("the engine core %s did not exit after the API servers; killing it", core.name)
        return 1 if failed else 0

    def kill_leftovers(self) -> None:
        for child in [*self.workers, *self.cores]:
            if child.is_alive():
                child.kill()
                child.join(5)
