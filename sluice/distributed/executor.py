"""Rank 0 of a tensor-parallel engine (tensor_parallel_size > 1): the engine core's runner.

    engine-core process                                  ranks 1..N-1 (worker.py)
    EngineCore --launch/collect--> TPExecutor            mp:  child processes (MPExecutor, here)
                                     | ModelRunner        ray: Ray actors (RayExecutor, ray_executor.py)
                                     | (rank 0: samples, talks to the scheduler)
                                     | each step: pickled SchedulerOutput --socket--> every worker
                                     '-- the forward's collectives (all-reduce, all-gather) with them

Every rank runs the same step on its shard of the weights; rank 0's sampled ids are broadcast so all
ranks append the same tokens. Set-up calls (load, KV sizing: the smallest of the ranks' probes, KV
allocation) run on all ranks together. A TP = 1 engine never imports this module. The two backends differ
only in how a rank is started, stopped and seen to end (``RankHandle``, ``_start_workers``,
``_wait_for_an_exit``); the socket protocol, the set-up calls, the steps and the watchdog are shared.

A worker that dies takes the engine down: a watchdog thread waits for any worker to end (a pidfd per
process; the Ray actor's task ref); on an exit it logs which rank died and ends this process with exit
code 1 (a step blocked in a collective with the dead rank would otherwise wait for the collective's
timeout). The next call that reaches a dead worker raises ``TPWorkerDiedError`` first when it can.
"""
from __future__ import annotations

import atexit
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from sluice.distributed.parallel_state import destroy_tp_group, init_tp_group, set_nccl_env_defaults
from sluice.distributed.worker import COMMANDS, SHUTDOWN, STEP, set_rank_cpu_threads
from sluice.worker.model_runner import make_model_runner

logger = logging.getLogger(__name__)

# How long a step may stay blocked after a worker died before the watchdog ends the process.
DEATH_GRACE_S = 2.0


class TPWorkerDiedError(RuntimeError):
    """A tensor-parallel worker (process or Ray actor) exited or reported a failure: the engine cannot go on."""


class RankHandle:
    """One rank 1..N-1 as rank 0 sees it: the connection it reads commands from, and whether it is gone.
    A backend says how the rank runs (``where``, ``exit_status``, ``stop``); the rest is shared."""

    rank: int
    conn: Connection

    @property
    def where(self) -> str:
        """What the rank runs in, for messages: "pid 1234", "Ray actor 3f2a..."."""
        raise NotImplementedError

    def exit_status(self) -> str | None:
        """How the rank ended ("exited with code 1"); None while it runs."""
        raise NotImplementedError

    def stop(self, timeout_s: float) -> None:
        """Waits up to ``timeout_s`` for the rank to end after SHUTDOWN, then ends it by force."""
        raise NotImplementedError

    def describe_exit(self) -> str:
        status = self.exit_status()
        message = f"tensor-parallel worker rank {self.rank} ({self.where}) " + (status or "stopped answering")
        if self.conn is not None and self.conn.poll(0):
            try:
                kind, detail = self.conn.recv()
                if kind == "error":
                    message += f":\n{detail}"
            except (EOFError, OSError):
                pass
        return message


class _ProcessRank(RankHandle):
    """One spawned rank: its process, the socket to it, and a pidfd that becomes readable when it exits."""

    def __init__(self, rank: int, payload: tuple) -> None:
        self.rank = rank
        ours, theirs = socket.socketpair()
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        self.process = subprocess.Popen([sys.executable, "-m", "sluice.distributed.worker", str(theirs.fileno())],
                                        pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL)
        theirs.close()
        self.conn = Connection(ours.detach())
        self.pidfd = os.pidfd_open(self.process.pid)
        self.conn.send(payload)

    @property
    def where(self) -> str:
        return f"pid {self.process.pid}"

    def exit_status(self) -> str | None:
        code = self.process.poll()
        return None if code is None else f"exited with code {code}"

    def stop(self, timeout_s: float) -> None:
        try:
            self.process.wait(max(0.1, timeout_s))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.conn.close()
        os.close(self.pidfd)


class TPExecutor:
    """What the EngineCore calls its runner when tensor_parallel_size > 1: rank 0's ModelRunner (every attribute
    not defined here is the runner's) plus the ranks 1..N-1 it drives. A backend starts those ranks
    (``_start_workers``) and waits for one to end (``_wait_for_an_exit``); sending steps, set-up calls,
    the watchdog and shutdown are the same for all (backends.make_tp_executor picks one)."""

    def __init__(self, config: Any) -> None:
        world_size = config.parallel.tensor_parallel_size
        if config.model.device == "cuda":
            import torch
            if torch.cuda.device_count() < world_size:
                raise ValueError(f"tensor_parallel_size {world_size} needs as many GPUs; "
                                 f"{torch.cuda.device_count()} are visible")
        set_rank_cpu_threads(config, world_size)
        set_nccl_env_defaults()  # inherited by the workers
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        self._closing = False
        self._dead: str | None = None
        self._workers: list[RankHandle] = []
        self._watchdog: threading.Thread | None = None
        atexit.register(self.shutdown)
        try:
            self._workers = self._start_workers(config, world_size, init_method)
            self._join_group(world_size, init_method, config.model.device)
        except BaseException:
            self.shutdown()
            raise
        self._watchdog = threading.Thread(target=self._watch_workers, name="tp-worker-watchdog", daemon=True)
        self._watchdog.start()
        self.runner = make_model_runner(config)

    def __getattr__(self, name: str) -> Any:
        runner = self.__dict__.get("runner")
        if runner is None:
            raise AttributeError(name)
        return getattr(runner, name)

    # ---- what a backend provides -----------------------------------------------------------
    def _start_workers(self, config: Any, world_size: int, init_method: str) -> list[RankHandle]:
        """Starts ranks 1..N-1 and sends each (config, rank, world size, init method, parent pid or None)."""
        raise NotImplementedError

    def _wait_for_an_exit(self) -> RankHandle | None:
        """Blocks until a worker ends (that worker) or shutdown begins (None)."""
        raise NotImplementedError

    def _wake_watchdog(self) -> None:
        """Makes a blocked ``_wait_for_an_exit`` return (shutdown has begun)."""

    def _release(self) -> None:
        """What the backend frees once every worker has stopped."""

    # ---- start-up ------------------------------------------------------------------------------
    def _join_group(self, world_size: int, init_method: str, device_type: str) -> None:
        """Joins the TP group in a thread, so that a worker dying before it joins fails start-up, not hangs it."""
        failure: list[BaseException] = []

        def join() -> None:
            try:
                init_tp_group(0, world_size, init_method, device_type)
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                failure.append(exc)

        thread = threading.Thread(target=join, name="tp-init", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.1)
            for worker in self._workers:
                if worker.exit_status() is not None:
                    raise TPWorkerDiedError(worker.describe_exit() + " before joining the tensor-parallel group")
        if failure:
            raise failure[0]

    # ---- the watchdog ------------------------------------------------------------------
    def _watch_workers(self) -> None:
        worker = self._wait_for_an_exit()
        if worker is None or self._closing:
            return
        self._dead = worker.describe_exit()
        logger.error("%s; the engine stops", self._dead)
        time.sleep(DEATH_GRACE_S)
        if not self._closing:
            logger.critical("%s: exiting", self._dead)
            logging.shutdown()
            os._exit(1)

    def _check_workers(self) -> None:
        if self._dead is not None:
            raise TPWorkerDiedError(self._dead)
        for worker in self._workers:
            if worker.conn.poll(0) or worker.exit_status() is not None:  # a worker only writes when it fails
                self._dead = worker.describe_exit()
                raise TPWorkerDiedError(self._dead)

    # ---- calls every rank runs -----------------------------------------------------------
    def _send(self, message: tuple) -> None:
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        for worker in self._workers:
            try:
                worker.conn.send_bytes(payload)
            except OSError:
                self._dead = worker.describe_exit()
                raise TPWorkerDiedError(self._dead) from None

    def _run_everywhere(self, command: str, *args: Any) -> Any:
        """COMMANDS[command] on every rank at once; rank 0's result."""
        self._check_workers()
        self._send((command, args))
        result = COMMANDS[command](self.runner, *args)
        for worker in self._workers:
            try:
                kind, detail = worker.conn.recv()
            except (EOFError, OSError):
                kind, detail = "error", None
            if kind != "ok":
                self._dead = worker.describe_exit() + (f":\n{detail}" if detail else "")
                raise TPWorkerDiedError(self._dead)
        return result

    def load_model(self) -> None:
        self._run_everywhere("load_model")

    def determine_num_kv_blocks(self, cache: Any) -> int:
        return self._run_everywhere("num_kv_blocks", cache)

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self._run_everywhere("initialize_kv_cache", num_blocks)

    def initialize_host_kv_cache(self, num_host_blocks: int) -> None:
        self._run_everywhere("initialize_host_kv_cache", num_host_blocks)

    # ---- steps ---------------------------------------------------------------------------
    def launch(self, scheduler_output: Any, grammar: Any = None) -> Any:
        """Sends the step to every worker, then launches it here (grammars apply on rank 0, which samples)."""
        self._check_workers()
        self._send((STEP, (scheduler_output,)))
        try:
            return self.runner.launch(scheduler_output, grammar)
        except RuntimeError as exc:
            self._blame_dead_worker(exc)
            raise

    def collect(self, step: Any) -> Any:
        try:
            return self.runner.collect(step)
        except RuntimeError as exc:
            self._blame_dead_worker(exc)
            raise

    def _blame_dead_worker(self, exc: RuntimeError) -> None:
        """A collective fails when a peer's connection drops: say which worker died, if one did."""
        deadline = time.monotonic() + 1.0
        while True:
            for worker in self._workers:
                if worker.exit_status() is not None:
                    self._dead = self._dead or worker.describe_exit()
                    raise TPWorkerDiedError(self._dead) from exc
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)

    def execute(self, scheduler_output: Any, grammar: Any = None) -> Any:
        return self.collect(self.launch(scheduler_output, grammar))

    def shutdown(self) -> None:
        """Stops the workers and leaves the TP group (idempotent)."""
        if self._closing:
            return
        self._closing = True
        atexit.unregister(self.shutdown)
        self._wake_watchdog()
        for worker in self._workers:
            try:
                worker.conn.send_bytes(pickle.dumps((SHUTDOWN, ())))
            except OSError:
                pass
        deadline = time.monotonic() + 5.0
        for worker in self._workers:
            worker.stop(deadline - time.monotonic())
        if self._watchdog is not None and self._watchdog is not threading.current_thread():
            self._watchdog.join(1.0)  # it returns once it sees the shutdown; the backend's release comes after
        destroy_tp_group()
        self._release()


class MPExecutor(TPExecutor):
    """``--distributed-executor-backend mp``: each rank a child process (python -m sluice.distributed.worker)
    over a socket pair; the watchdog waits on their pidfds."""

    def _start_workers(self, config: Any, world_size: int, init_method: str) -> list[RankHandle]:
        self._wake_r, self._wake_w = os.pipe()
        return [_ProcessRank(rank, (config, rank, world_size, init_method, os.getpid()))
                for rank in range(1, world_size)]

    def _wait_for_an_exit(self) -> RankHandle | None:
        pidfds = {worker.pidfd: worker for worker in self._workers}
        ready = wait(list(pidfds) + [self._wake_r])
        if self._wake_r in ready:
            return None
        worker = pidfds[next(fd for fd in ready if fd in pidfds)]
        worker.process.wait()
        return worker

    def _wake_watchdog(self) -> None:
        if "_wake_w" in self.__dict__:
            os.write(self._wake_w, b"x")

    @property
    def worker_pids(self) -> list[int]:
        return [worker.process.pid for worker in self._workers]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
